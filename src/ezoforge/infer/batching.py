"""Continuous batching for `ezo serve`: one decoding loop over a shared KV cache that requests join and leave
at step boundaries.

Why our own loop: transformers' ContinuousBatchingManager fixes greedy-or-sampled and the logits processors
for the whole manager (no per-request temperature, seed or JSON-schema constraint) and ran the bundled model at
about 2x a single request on this CPU; serving needs all three per request.

The cache is a plain DynamicCache, left-padded: row r's keys sit at the right end, `mask` marks the real
columns. A request joins by prefilling its prompt alone and padding the two caches to one width; it leaves by
dropping its row (and any columns no remaining row uses).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ezoforge.config import ServeConfig
from ezoforge.infer.generate import Completion, Generator, Sampling, TextSoFar, finish_reason

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the server takes; the client should retry later."""


class Timeout(Exception):
    """The request ran past its deadline (queueing included)."""


class Shutdown(Exception):
    """The server stopped before the request finished."""


@dataclass(eq=False)
class Job:
    """One request in the loop. `deliver` gets text pieces, then a Completion or an exception, from the loop's
    thread; `cancel()` (any thread) drops the request at the next step."""

    prompt: list[int]
    sampling: Sampling
    deliver: Callable[[object], None]
    deadline: float | None = None
    allowed: Callable | None = None  # JSON-schema constraint: (batch_id, ids tensor) -> allowed token ids
    rng: torch.Generator | None = None  # a seeded request samples the same tokens whatever else is in the batch
    text: TextSoFar | None = None
    out: list[int] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class Batcher:
    def __init__(self, gen: Generator, limits: ServeConfig):
        self.gen, self.max_batch, self.max_queue = gen, limits.max_batch, limits.max_queue
        self.prefill_tokens = limits.max_prefill_tokens
        if self.max_batch > 1 and not _plain_dynamic_cache(gen.model):
            log.warning("this model's KV cache cannot be padded to join requests: serving one request at a time")
            self.max_batch = 1
        self.waiting: collections.deque[Job] = collections.deque()
        self.wake = threading.Condition()
        self.closed = False
        self.running = 0  # requests in the decoding batch now
        self.thread = threading.Thread(target=self._loop, name="ezo-batcher", daemon=True)
        self.thread.start()

    def submit(self, prompt: list[int], sampling: Sampling, deliver: Callable[[object], None],
               timeout: float | None = None) -> Job:
        job = Job(prompt, sampling, deliver, time.monotonic() + timeout if timeout else None)
        if sampling.json_schema is not None:
            job.allowed = self.gen.structured.allowed_tokens_fn(sampling.json_schema)
        if sampling.seed is not None:
            job.rng = torch.Generator().manual_seed(sampling.seed)
        with self.wake:
            if self.closed:
                raise Shutdown("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(job)
            self.wake.notify()
        return job

    def queued(self) -> int:
        return len(self.waiting)

    def close(self, wait: float = 5.0) -> None:
        """Stop taking requests, end every running and waiting one with Shutdown, stop the loop."""
        with self.wake:
            self.closed = True
            self.wake.notify()
        if wait and threading.current_thread() is not self.thread:
            self.thread.join(wait)

    # ------------------------------------------------------------------ the loop (its own thread)

    def _loop(self) -> None:
        rows: list[Job] = []
        cache = mask = None
        while True:
            with self.wake:
                if not self.waiting and not rows and not self.closed:
                    _release_freed_memory()
                while not self.waiting and not rows and not self.closed:
                    self.wake.wait()
                if self.closed:
                    break
                self.waiting = collections.deque(j for j in self.waiting if not self._ended_early(j))
                joining = []
                while self.waiting and len(rows) + len(joining) < self.max_batch:
                    joining.append(self.waiting.popleft())
            gone = [i for i, job in enumerate(rows) if self._ended_early(job)]
            if gone:
                rows, cache, mask = self._drop(rows, cache, mask, gone)
            self.running = len(rows)
            if not rows and not joining:
                continue
            try:
                with self.gen.lock, torch.inference_mode():
                    logits = []
                    if rows:
                        step = torch.tensor([[job.out[-1]] for job in rows], device=mask.device)
                        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                        logits, cache = self._forward(step, mask, cache)
                        logits = [logits]
                    if joining:
                        joining.sort(key=lambda j: len(j.prompt))  # neighbours in length pad each other little
                        parts = [(cache, mask)] if rows else []
                        for group in _prefill_groups(joining, self.prefill_tokens):
                            new_logits, new_cache, new_mask = self._prefill(group)
                            logits.append(new_logits)
                            parts.append((new_cache, new_mask))
                        cache, mask = _merge(parts)
                        rows = rows + joining
                    next_ids = self._sample(rows, torch.cat(logits))
            except Exception as e:  # a failed step fails its batch, never the server
                log.exception("decoding step failed")
                for job in {*rows, *joining}:
                    job.deliver(e)
                rows, cache, mask = [], None, None
                continue
            finished = []
            for i, (job, tok) in enumerate(zip(rows, next_ids)):
                job.out.append(tok)
                so_far = job.text = job.text or TextSoFar(self.gen.decode, job.sampling.stop)
                ended = tok in self.gen.eos_ids
                if not ended and (piece := so_far.add(tok)):
                    job.deliver(piece)
                if ended or so_far.stopped or len(job.out) >= job.sampling.max_new_tokens:
                    if piece := so_far.finish():
                        job.deliver(piece)
                    reason = finish_reason(ended or so_far.stopped, len(job.out), job.sampling.max_new_tokens)
                    job.deliver(Completion(so_far.text.strip(), len(job.prompt), len(job.out), reason))
                    finished.append(i)
            if finished:
                rows, cache, mask = self._drop(rows, cache, mask, finished)
            self.running = len(rows)
        for job in rows + list(self.waiting):
            job.deliver(Shutdown("the server is shutting down"))
        self.waiting.clear()

    @staticmethod
    def _ended_early(job: Job) -> bool:
        if job.cancelled.is_set():
            return True
        if job.deadline is not None and time.monotonic() > job.deadline:
            job.deliver(Timeout(f"the request did not finish in time ({len(job.out)} tokens generated)"))
            return True
        return False

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = self.gen.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                             use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), out.cache

    def _prefill(self, jobs: list[Job]):
        width = max(len(j.prompt) for j in jobs)
        pad = self.gen.tokenizer.pad_token_id or 0
        device = self.gen.loaded.device
        ids = torch.tensor([[pad] * (width - len(j.prompt)) + j.prompt for j in jobs], device=device)
        mask = torch.tensor([[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in jobs], device=device)
        logits, cache = self._forward(ids, mask, None)
        return logits, cache, mask

    def _sample(self, rows: list[Job], logits: torch.Tensor) -> list[int]:
        picked = logits.argmax(-1).tolist()  # greedy rows, in one go
        for i, (job, row) in enumerate(zip(rows, logits)):
            s = job.sampling
            if job.allowed is None and s.temperature == 0:
                continue
            if job.allowed is not None:
                allowed = job.allowed(0, torch.tensor(job.prompt + job.out))
                keep = torch.full_like(row, float("-inf"))
                keep[allowed] = 0
                row = row + keep
            if s.temperature == 0:
                picked[i] = int(row.argmax())
                continue
            probs = torch.softmax(row / s.temperature, dim=-1)
            if s.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                outside = sorted_p.cumsum(0) - sorted_p > s.top_p  # keep the smallest set reaching top_p
                probs[order[outside]] = 0
            picked[i] = int(torch.multinomial(probs.cpu(), 1, generator=job.rng))
        return picked

    @staticmethod
    def _drop(rows: list[Job], cache, mask, gone: list[int]):
        keep = [i for i in range(len(rows)) if i not in set(gone)]
        if not keep:
            return [], None, None
        index = torch.tensor(keep, device=mask.device)
        mask = mask[index]
        first = int(mask.any(0).nonzero()[0])  # columns left of this are padding in every remaining row
        mask = mask[:, first:]
        for layer in cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        return [rows[i] for i in keep], cache, mask


def _prefill_groups(jobs: list[Job], budget: int) -> list[list[Job]]:
    """Consecutive groups of at most `budget` padded prompt tokens each (a longer prompt goes alone)."""
    groups, group, width = [], [], 0
    for job in jobs:
        width = max(width, len(job.prompt))
        if group and (len(group) + 1) * width > budget:
            groups.append(group)
            group, width = [], len(job.prompt)
        group.append(job)
    return groups + [group]


def _merge(parts: list[tuple]):
    """One cache for all rows, in order: each (cache, mask) padded on the left to the widest, then stacked."""
    if len(parts) == 1:
        return parts[0]
    width = max(mask.shape[1] for _, mask in parts)
    cache = parts[0][0]
    for i, layer in enumerate(cache.layers):
        layer.keys = torch.cat([_pad_left(c.layers[i].keys, width) for c, _ in parts])
        layer.values = torch.cat([_pad_left(c.layers[i].values, width) for c, _ in parts])
    mask = torch.cat([F.pad(mask, (width - mask.shape[1], 0)) for _, mask in parts])
    return cache, mask


def _pad_left(kv: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(kv, (0, 0, width - kv.shape[-2], 0))  # [batch, heads, time, dim]: pad time on the left


def _plain_dynamic_cache(model) -> bool:
    """Only full-attention layers can be padded and concatenated (a sliding window keeps its own offsets)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except Exception:
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _release_freed_memory() -> None:
    """Idle: hand the batch's freed KV-cache memory back to the OS (glibc keeps it in its arenas otherwise)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc (e.g. musl): nothing to trim
            pass
