"""Offloaded activation checkpointing: each checkpointed layer's input lives in host memory between its forward and
its recompute.

With checkpointing, what stays on the GPU through the backward is one hidden state per checkpointed layer (the
input its recompute starts from): layers x tokens x hidden bf16, ~5 GiB for a 70B at 4,096 tokens. Like
`torch.autograd.graph.save_on_cpu` (which transformers' `offload=True` wraps around each checkpoint), we hand those
inputs to pinned host memory through saved-tensor hooks, but copy on a side stream so the copies overlap compute
(torchtune's `OffloadActivations` and Unsloth's offloaded checkpointer do the same), and in the backward we bring
back layer i-1's input while layer i recomputes. Only the checkpoint inputs are moved: the recompute runs under
torch's own hooks, which shadow ours, and the layers' kwargs (masks, rotary tables) are not saved tensors.
"""
from __future__ import annotations

import logging
import weakref

import torch
from torch.autograd.graph import saved_tensors_hooks
from transformers import TrainerCallback

from ezoforge.errors import ConfigError

log = logging.getLogger(__name__)


class _Saved:
    """One layer input held in host memory, linked to the previous layer's so the backward can prefetch it."""

    __slots__ = ("host", "device", "prev", "fetched", "ready", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, prev: _Saved | None):
        self.host, self.device = host, device
        self.prev = weakref.ref(prev) if prev is not None else None  # weak: a finished step's graph may go
        self.fetched: torch.Tensor | None = None
        self.ready = None  # the CUDA event after which `fetched` holds the data


class BoundaryOffload(saved_tensors_hooks):
    """Saved-tensor hooks that keep tensors in (pinned, on CUDA) host memory; entered around each checkpoint call."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.last: weakref.ref | None = None
        self.moved_bytes = 0  # host copies made, for tests and logs
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if t.numel() == 0 or isinstance(t, torch.nn.Parameter):  # checkpoint's empty marker tensor; weights stay put
            return t
        host = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, pin_memory=self.cuda)
        if self.cuda and t.is_cuda:
            compute = torch.cuda.current_stream()
            self.stream.wait_stream(compute)  # t is written by the compute stream
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        else:
            host.copy_(t)
        self.moved_bytes += t.numel() * t.element_size()
        saved = _Saved(host, t.device, self.last() if self.last else None)
        self.last = weakref.ref(saved)
        return saved

    def _unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        if saved.fetched is None:
            self._fetch(saved)
        if saved.ready is not None:
            torch.cuda.current_stream().wait_event(saved.ready)
        out, saved.fetched, saved.ready = saved.fetched, None, None
        prev = saved.prev() if saved.prev else None
        if prev is not None and prev.fetched is None:
            self._fetch(prev)  # the next layer back: its copy runs while this layer recomputes
        return out

    def _fetch(self, saved: _Saved) -> None:
        if not (self.cuda and saved.device.type == "cuda"):
            saved.fetched = saved.host.to(saved.device)
            return
        # Allocated on the compute stream, filled on the side stream once the compute stream is past what used it.
        saved.fetched = torch.empty(saved.host.shape, dtype=saved.host.dtype, device=saved.device)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            saved.fetched.copy_(saved.host, non_blocking=True)
            saved.ready = torch.cuda.Event()
            saved.ready.record(self.stream)


def offload_checkpoints(model: torch.nn.Module, device: torch.device) -> BoundaryOffload:
    """Wrap the checkpoint function of every checkpointing layer so its saved inputs go to host memory.
    Idempotent; returns the hooks (one per model). Raises when no layer checkpoints: nothing could be offloaded."""
    hooks = getattr(model, "_ezo_offload", None) or BoundaryOffload(device)
    wrapped = 0
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if not getattr(module, "gradient_checkpointing", False) or func is None:
            continue
        if not getattr(func, "_ezo_offloaded", False):
            def offloaded(*args, _func=func, **kwargs):
                with hooks:
                    return _func(*args, **kwargs)

            offloaded._ezo_offloaded = True
            module._gradient_checkpointing_func = offloaded
        wrapped += 1
    if not wrapped:
        raise ConfigError("train.offload_activations: no layer of this model checkpoints, so there is nothing to "
                          "offload (set it to auto or false)")
    model._ezo_offload = hooks
    return hooks


class OffloadCheckpoints(TrainerCallback):
    """Installs the offload once the Trainer has turned checkpointing on (it does so inside `train()`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.hooks: BoundaryOffload | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.hooks = offload_checkpoints(model, self.device)


def wants_offload(cfg, device: torch.device) -> bool:
    """`train.offload_activations` resolved: auto is on where it frees accelerator memory (CUDA, checkpointing)."""
    on = cfg.offloads_activations(device.type)
    if cfg.offload_activations == "auto" and not on:
        log.info("offload_activations auto: off (%s)",
                 "no gradient checkpointing" if device.type == "cuda" else f"{device.type} holds activations already")
    return on
