"""A durable request cache: each completed request is stored the moment it arrives, keyed by what determines it.

SQLite (WAL) gives atomic per-row commits, so a run killed mid-way keeps every finished answer and a rerun
sends only the missing requests.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.progress import Progress

from ezoforge.logs import console


def request_key(**parts: Any) -> str:
    """sha256 of the canonical JSON of everything that determines a response."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def answer_key(model: str, messages: list[dict], sampling: Any, sample: int = 0) -> str:
    """The one key of a model's answer to a conversation, in every answer cache (eval, prefer, `ezo generate`):
    the model's identity, the messages, the sampling it was drawn with (infer.generate.Sampling, with its seed) and
    the sample's index."""
    return request_key(kind="answer", model=model, messages=messages, sampling=dataclasses.asdict(sampling),
                       sample=sample)


class RequestCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def get(self, key: str) -> Any | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)",
                             (key, json.dumps(value, ensure_ascii=False)))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def cached(cache: RequestCache, keys: list[str], compute: Callable[[list[int]], list], batch: int, label: str,
           counts: Counter) -> list:
    """The value for each key: read from the cache, or computed `batch` at a time and stored as each batch ends."""
    values = [cache.get(k) for k in keys]
    todo = [i for i, v in enumerate(values) if v is None]
    counts[f"{label}_cached"] += len(keys) - len(todo)
    counts[f"{label}_computed"] += len(todo)
    if todo:
        with Progress(console=console) as progress:
            bar = progress.add_task(label, total=len(keys), completed=len(keys) - len(todo))
            for start in range(0, len(todo), batch):
                chunk = todo[start: start + batch]
                for i, value in zip(chunk, compute(chunk)):
                    cache.put(keys[i], value)
                    values[i] = value
                progress.advance(bar, len(chunk))
    return values
