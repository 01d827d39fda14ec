"""The contamination check (eval/contamination.py: the tasks' n-grams indexed, the training text streamed once)
against the named baseline, a training-side index (every training n-gram in one set, then each task's n-grams
looked up), on the same texts in one run. Prints texts/s and peak memory growth of each, the ratio last.

    .venv/bin/python bench/contamination_bench.py [MB of training text, default 4]

Training text: random strings of pieces of the bundled demo documents (fineweb-demo.parquet); tasks: the bundled demo tasks, one of them planted once so both find the same single task.
"""
from __future__ import annotations

import os
import random
import sys
import time
import tracemalloc
from pathlib import Path

from ezoforge.config import bundled_data
from ezoforge.eval import contamination
from ezoforge.eval.tasks import load_suite
from ezoforge.records import read_rows, write_jsonl


def make_corpus(megabytes: float) -> list[dict]:
    """Japanese-looking texts of ~300 characters strung from random 3-character pieces of the demo documents, so
    nearly every 13-gram is distinct, as in a real corpus."""
    docs = [r["text"] for _, r in read_rows(bundled_data("bundled:web/fineweb-demo.parquet"))]
    pieces = [d[i: i + 3] for d in docs for i in range(0, len(d) - 3, 3)]
    rng = random.Random(0)
    rows, size = [], 0
    while size < megabytes * 1e6:
        text = "".join(rng.choices(pieces, k=100))
        rows.append({"id": str(len(rows)), "text": text, "source": "bench"})
        size += len(text.encode())
    return rows


def training_side(tasks, texts: list[str], n: int, threshold: float) -> list[str]:
    """The baseline: index every training n-gram, then look up each task text's n-grams."""
    index: set[str] = set()
    for t in texts:
        index |= contamination.ngrams(contamination.normalize(t), n)
    flagged = []
    for task in tasks:
        for parts in contamination.task_texts(task).values():
            grams = set().union(*(contamination.ngrams(contamination.normalize(p), n) for p in parts)) if parts else set()
            if grams and len(grams & index) / len(grams) >= threshold:
                flagged.append(task.id)
                break
    return flagged


def measure(label: str, fn) -> tuple[float, list[str]]:
    """Wall time of one call, then (a second call, as tracing slows it) the peak of Python allocations."""
    start = time.perf_counter()
    flagged = fn()
    seconds = time.perf_counter() - start
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"{label:<28} {seconds:7.2f} s  peak traced memory {peak / 2**20:8.1f} MiB  flagged {flagged}")
    return seconds, flagged


def main() -> None:
    import tempfile

    megabytes = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
    tasks = load_suite("elyza100:" + bundled_data("bundled:tasks/demo-tasks.jsonl")).items
    with tempfile.TemporaryDirectory() as tmp:
        rows = make_corpus(megabytes)
        rows[len(rows) // 2]["text"] += tasks[5].reference  # one planted task
        path = Path(tmp) / "docs.jsonl"
        write_jsonl(path, rows)
        source = contamination.Source("documents", "file", path)
        texts = list(contamination.texts(source))
        print(f"{len(texts):,} training texts, {sum(len(t) for t in texts) / 1e6:.1f} M characters; "
              f"{len(tasks)} tasks; n=13, threshold 0.5; load average {os.getloadavg()[0]:.1f}")
        ours, a = measure("ours (task-side index)", lambda: [f["task_id"] for f in contamination.check(
            tasks, [source], 13, 0.5)["flagged"]])
        base, b = measure("baseline (training index)", lambda: training_side(tasks, texts, 13, 0.5))
        assert a == b, (a, b)
        print(f"ratio baseline/ours (time): {base / ours:.2f}x")


if __name__ == "__main__":
    main()
