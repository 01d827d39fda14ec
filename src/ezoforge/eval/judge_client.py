"""Sending answers to the judge: a durable cache in front, a lazily started loopback server for `local`,
a thread pool for concurrency, and a stop on failures every later request would share."""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack

from rich.progress import Progress

from ezoforge.cache import RequestCache, request_key
from ezoforge.config import LlamaCppConfig
from ezoforge.eval.judge_prompt import Verdict
from ezoforge.eval.settings import EvalConfig
from ezoforge.eval.task_types.judged import Unit
from ezoforge.infer.engines import choose, identity, open_engine
from ezoforge.logs import console
from ezoforge.models import Loaded, model_identity
from ezoforge.records import Judgement
from ezoforge.remote import RemoteError, chat, make_client

# Statuses that mean the judge itself is unusable (unreachable, bad key, unknown model), not this one request.
_FATAL = (None, 401, 403, 404)


class Judge:
    def __init__(self, cfg: EvalConfig, cache: RequestCache, stack: ExitStack, local_model: Callable[[], Loaded]):
        self.cfg, self.cache, self.stack, self.local_model = cfg, cache, stack, local_model
        self.lock = threading.Lock()
        self.sent = self.cached = 0
        self.broken: str | None = None
        # A remote client is built now so a missing API key fails before any work; `local` starts on first need.
        self.client = None if cfg.judge_url == "local" else make_client(
            cfg.judge_url, cfg.judge_api_key_env, cfg.judge_timeout, cfg.judge_max_retries)
        # A local judge's engine (eval.judge_backend) is chosen now: a stated one that cannot run fails before any work.
        self.engine = choose(cfg.judge_backend, "eval.judge_backend", cfg.judge_model) if self.client is None else None

    @functools.cached_property
    def judge_identity(self) -> str:
        """A served name can hide any model; a `local` judge is our own load, known by its weights and engine."""
        if self.cfg.judge_url == "local":
            return identity(self.engine, model_identity(self.cfg.judge_model))
        return self.cfg.judge_model

    def _connect(self):
        with self.lock:
            if self.client is None:
                # Only a `local` judge needs the server (fastapi, uvicorn): eval runs where they are not installed.
                from ezoforge.infer.serve import BackgroundServer, create_app

                # Its server decodes as many verdicts together as eval.concurrency sends.
                gen = open_engine(self.engine, self.cfg.judge_model, None, LlamaCppConfig(), self.cfg.concurrency,
                                  self.local_model)
                self.stack.callback(gen.close)
                app = create_app(gen, self.cfg.judge_model)
                url = self.stack.enter_context(BackgroundServer(app)) + "/v1"
                # In-process, a slow reply means a slow CPU, not a lost request: a client timeout would only make
                # the server generate the same verdict twice, so wait for it and never retry.
                self.client = make_client(url, timeout=max(self.cfg.judge_timeout, 3600.0), max_retries=0)
            return self.client

    def ask(self, messages: list[dict[str, str]], judgment: int, prompt_version: str,
            fmt: dict | None) -> dict:
        """The reply to `messages` as verdict number `judgment` (its own cache entry and sampling seed): text, and
        the `model` and `system_fingerprint` the judge reported."""
        temperature = self.cfg.judge_temperature
        key = request_key(kind="judge", url=self.cfg.judge_url, judge=self.judge_identity,
                          prompt_version=prompt_version, messages=messages, max_tokens=self.cfg.judge_max_tokens,
                          temperature=temperature, judgment=judgment, **({"response_format": fmt} if fmt else {}))
        hit = self.cache.get(key)
        if hit is not None:
            with self.lock:
                self.cached += 1
            return hit
        if self.broken:
            raise RemoteError(self.broken)
        try:
            reply = chat(self._connect(), self.cfg.judge_model, messages, self.cfg.judge_max_tokens,
                         temperature=temperature, seed=judgment, response_format=fmt)
        except RemoteError as e:
            if e.status in _FATAL:
                self.broken = f"not sent: an earlier request failed ({e})"
            raise
        value = {"text": reply.text, "finish_reason": reply.finish_reason, "model": reply.model,
                 "system_fingerprint": reply.system_fingerprint}
        self.cache.put(key, value)
        with self.lock:
            self.sent += 1
        return value

    def _verdict(self, unit: Unit, said: list[dict]) -> Verdict:
        """The unit's verdict; each reply the judge gave for it is appended to `said`."""
        judged_as = unit.judged_as
        # A type's verdicts may be held to its schema (ours); others are free text (MT-Bench's, FastChat's).
        fmt = judged_as.response_format(self.cfg.judge_reason_max_chars) if self.cfg.judge_structured else None

        def ask(messages):
            said.append(self.ask(messages, unit.judgment, judged_as.prompt_version, fmt))
            return said[-1]["text"]

        return judged_as.verdict(ask, unit, self.cfg.judge_reasks)

    def judge_all(self, units: list[Unit], model_name: str) -> list[dict]:
        """One Judgement per unit, in order; a request that fails is recorded as an error, never a grade."""
        def one(unit: Unit) -> dict:
            said: list[dict] = []
            try:
                verdict = self._verdict(unit, said)
            except RemoteError as e:
                verdict = Verdict(None, "", f"judge request failed: {e}")
            last = said[-1] if said else {}
            return Judgement(task_id=unit.task.id, model=model_name, answer=unit.answers[-1],
                             judge=self.cfg.judge_model, grade=verdict.grade, error=verdict.error,
                             reason=verdict.reason, prompt_version=unit.judged_as.prompt_version,
                             prompt=unit.judged_as.prompt_name(unit),
                             sample=unit.sample, turn=unit.turn, judgment=unit.judgment,
                             judge_served=last.get("model"), system_fingerprint=last.get("system_fingerprint"),
                             ).model_dump()

        # `local` too: the in-process server batches concurrent requests.
        with ThreadPoolExecutor(self.cfg.concurrency) as pool, Progress(console=console) as progress:
            bar = progress.add_task("judging", total=len(units))
            futures = [pool.submit(one, u) for u in units]
            for _ in as_completed(futures):
                progress.advance(bar)
            return [f.result() for f in futures]
