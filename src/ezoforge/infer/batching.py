"""Continuous batching: one decoding loop that requests join and leave at step boundaries, behind `ezo serve` (both
engines) and every llama.cpp generation.

Why our own loop: transformers' ContinuousBatchingManager fixes greedy-or-sampled and the logits processors
for the whole manager (no per-request temperature, seed or JSON-schema constraint) and ran the bundled model at
about 2x a single request on this CPU; serving needs all three per request.

The loop owns the queue, limits, cancellation, sampling and text; a decoder owns the KV cache. `PaddedCache`
(transformers) keeps a plain DynamicCache, left-padded: row r's keys sit at the right end, `mask` marks the real
columns. A request joins by prefilling its prompt alone and padding the two caches to one width; it leaves by
dropping its row (and any columns no remaining row uses). llama.cpp's decoder (`infer.llamacpp.Slots`) gives each
request a sequence of one shared context instead.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ezoforge.config import ServeConfig
from ezoforge.completion import Completion
from ezoforge.infer.generate import ChatEngine, Generator, Sampling, TextSoFar, finish_reason
from ezoforge.models import kv_cache_name

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
    top_k: int = 0  # sample from the k likeliest tokens only (0: all), as transformers' generate does with top_k
    allowed: Callable | None = None  # JSON-schema constraint: (batch_id, ids tensor) -> allowed token ids
    # Its own draws: a seeded request samples the same tokens whatever else is in the batch.
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    text: TextSoFar | None = None
    out: list[int] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class Decoder(Protocol):
    """The KV cache side of the loop: which rows it can hold, and one step over them."""

    max_rows: int

    def admit(self, job: Job, rows: list[Job]) -> bool:
        """Whether `job` can join `rows` now (False: it waits); raises when it never can."""

    def step(self, rows: list[Job], joining: list[Job]) -> torch.Tensor | np.ndarray:
        """Next-token logits, one row each: `rows` after their last token, then `joining` after their prompts."""

    def drop(self, rows: list[Job], gone: list[int]) -> None:
        """Forget rows[i] for i in gone."""

    def reset(self) -> None:
        """Forget every row (after a failed step, or when the loop stops)."""


class Batcher:
    def __init__(self, gen: ChatEngine, limits: ServeConfig):
        self.gen, self.max_queue = gen, limits.max_queue
        # transformers' decoder lives here, beside the loop; another engine brings its own (llamacpp.Slots)
        self.decoder: Decoder = PaddedCache(gen, limits) if isinstance(gen, Generator) else gen.decoder(limits)
        self.max_batch = min(limits.max_batch, self.decoder.max_rows)
        self.waiting: collections.deque[Job] = collections.deque()
        self.wake = threading.Condition()
        self.closed = False
        self.running = 0  # requests in the decoding batch now
        self.thread = threading.Thread(target=self._loop, name="ezo-batcher", daemon=True)
        self.thread.start()

    def submit(self, prompt: list[int], sampling: Sampling, deliver: Callable[[object], None],
               timeout: float | None = None, top_k: int = 0) -> Job:
        job = Job(prompt, sampling, deliver, time.monotonic() + timeout if timeout else None, top_k)
        if sampling.json_schema is not None:
            job.allowed = self.gen.structured.allowed_tokens_fn(sampling.json_schema)
        if sampling.seed is not None:
            job.rng = np.random.default_rng(sampling.seed % 2**64)  # a negative seed wraps, as in torch.manual_seed
        with self.wake:
            if self.closed:
                raise Shutdown("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(job)
            self.wake.notify()
        return job

    def submit_all(self, prompts: list[list[int]], sampling: Sampling, deliver: Callable[[int, object], None],
                   top_k: int = 0) -> list[Job]:
        """Queue a batch call's prompts together (`deliver(i, event)` for prompt i): the loop admits none before all
        are queued, so which sequences decode together, and each reply's rounding, is the same run to run."""
        with self.wake:
            return [self.submit(p, sampling, lambda e, i=i: deliver(i, e), top_k=top_k) for i, p in enumerate(prompts)]

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
        while True:
            with self.wake:
                if not self.waiting and not rows and not self.closed:
                    _release_freed_memory()
                while not self.waiting and not rows and not self.closed:
                    self.wake.wait()
                if self.closed:
                    break
                self.waiting = collections.deque(j for j in self.waiting if not self._ended_early(j))
                joining = self._joining(rows)
            gone = [i for i, job in enumerate(rows) if self._ended_early(job)]
            if gone:
                self.decoder.drop(rows, gone)
                rows = [job for i, job in enumerate(rows) if i not in gone]
            self.running = len(rows)
            if not rows and not joining:
                if self.waiting:  # room is held by another loop on the same engine: wait for it to free some
                    time.sleep(0.01)
                continue
            joining.sort(key=lambda j: len(j.prompt))  # neighbours in length pad each other little
            try:
                with self.gen.lock, torch.inference_mode():
                    logits = self.decoder.step(rows, joining)
                rows = rows + joining
                next_ids = self._sample(rows, logits)
            except Exception as e:  # a failed step fails its batch, never the server
                log.exception("decoding step failed")
                for job in {*rows, *joining}:
                    job.deliver(e)
                self.decoder.reset()
                rows = []
                continue
            finished = [i for i, (job, tok) in enumerate(zip(rows, next_ids)) if self._take(job, tok)]
            if finished:
                self.decoder.drop(rows, finished)
                rows = [job for i, job in enumerate(rows) if i not in finished]
            self.running = len(rows)
        for job in rows + list(self.waiting):
            job.deliver(Shutdown("the server is shutting down"))
        self.decoder.reset()
        self.waiting.clear()

    def _joining(self, rows: list[Job]) -> list[Job]:
        """Waiting requests that join now, in arrival order, while the batch and the decoder have room."""
        joining: list[Job] = []
        while self.waiting and len(rows) + len(joining) < self.max_batch:
            try:
                if not self.decoder.admit(self.waiting[0], rows + joining):
                    break
            except Exception as e:  # it can never join: fail it alone
                self.waiting.popleft().deliver(e)
                continue
            joining.append(self.waiting.popleft())
        return joining

    def _take(self, job: Job, tok: int) -> bool:
        """Add the sampled token to its request, deliver what became text; whether the request is finished."""
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
            return True
        return False

    @staticmethod
    def _ended_early(job: Job) -> bool:
        if job.cancelled.is_set():
            return True
        if job.deadline is not None and time.monotonic() > job.deadline:
            job.deliver(Timeout(f"the request did not finish in time ({len(job.out)} tokens generated)"))
            return True
        return False

    @staticmethod
    def _sample(rows: list[Job], logits) -> list[int]:
        picked = logits.argmax(-1).tolist()  # greedy rows in one go, where the logits are (a GPU for transformers)
        for i, job in enumerate(rows):
            if job.allowed is not None or job.sampling.temperature > 0:
                row = logits[i]
                picked[i] = pick(row if isinstance(row, np.ndarray) else row.float().cpu().numpy(), job)
        return picked


def pick(logits: np.ndarray, job: Job) -> int:
    """The next token of a constrained or sampled request, as transformers' generate picks it: within the JSON
    schema's allowed tokens, after temperature, top-k and top-p (the nucleus cut from the unlikely end), drawn from
    the request's own generator. In numpy: torch's thread pool, woken by a small op every step, took the cores from
    llama.cpp's threads (its decoding ran at 40% of its speed in a process that had run a transformers model)."""
    scores = logits.astype(np.float64)
    if job.allowed is not None:
        allowed = np.asarray(job.allowed(0, torch.tensor(job.prompt + job.out)), dtype=np.int64)
        scores = np.where(np.isin(np.arange(scores.size), allowed), scores, -np.inf)
    s = job.sampling
    if s.temperature == 0:
        return int(scores.argmax())
    scores /= s.temperature
    ids = np.argpartition(scores, -job.top_k)[-job.top_k:] if 0 < job.top_k < scores.size else np.arange(scores.size)
    ids = ids[np.isfinite(scores[ids])]
    ids = ids[np.argsort(scores[ids], kind="stable")]  # least likely first
    probs = np.exp(scores[ids] - scores[ids[-1]])
    probs /= probs.sum()
    if s.top_p < 1:
        keep = np.cumsum(probs) > 1 - s.top_p
        keep[-1] = True
        ids, probs = ids[keep], probs[keep] / probs[keep].sum()
    return int(job.rng.choice(ids, p=probs))


class PaddedCache:
    """transformers' decoder: one left-padded DynamicCache for all rows."""

    def __init__(self, gen: Generator, limits: ServeConfig):
        self.gen, self.prefill_tokens = gen, limits.max_prefill_tokens
        self.max_rows = limits.max_batch
        if self.max_rows > 1 and not _plain_dynamic_cache(gen.model):
            log.warning("this model's KV cache cannot be padded to join requests: serving one request at a time")
            self.max_rows = 1
        self.cache = self.mask = None

    def admit(self, job: Job, rows: list[Job]) -> bool:
        return True

    def step(self, rows: list[Job], joining: list[Job]) -> torch.Tensor:
        logits = []
        if rows:
            step = torch.tensor([[job.out[-1]] for job in rows], device=self.mask.device)
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(rows), 1)], dim=1)
            step_logits, self.cache = self._forward(step, self.mask, self.cache)
            logits.append(step_logits)
        if joining:
            parts = [(self.cache, self.mask)] if rows else []
            for group in _prefill_groups(joining, self.prefill_tokens):
                new_logits, new_cache, new_mask = self._prefill(group)
                logits.append(new_logits)
                parts.append((new_cache, new_mask))
            self.cache, self.mask = _merge(parts)
        return torch.cat(logits)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = self.gen.model(input_ids=ids, attention_mask=mask, position_ids=positions, **{kv_cache_name(): cache},
                             use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), getattr(out, kv_cache_name())

    def _prefill(self, jobs: list[Job]):
        width = max(len(j.prompt) for j in jobs)
        pad = self.gen.tokenizer.pad_token_id or 0
        device = self.gen.loaded.device
        ids = torch.tensor([[pad] * (width - len(j.prompt)) + j.prompt for j in jobs], device=device)
        mask = torch.tensor([[0] * (width - len(j.prompt)) + [1] * len(j.prompt) for j in jobs], device=device)
        logits, cache = self._forward(ids, mask, None)
        return logits, cache, mask

    def drop(self, rows: list[Job], gone: list[int]) -> None:
        keep = [i for i in range(len(rows)) if i not in set(gone)]
        if not keep:
            self.reset()
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[index]
        first = int(mask.any(0).nonzero()[0])  # columns left of this are padding in every remaining row
        self.mask = mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]

    def reset(self) -> None:
        self.cache = self.mask = None


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
