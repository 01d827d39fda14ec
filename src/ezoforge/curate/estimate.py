"""`ezo plan`'s figures for curate: host memory per worker and the measured rate of the filter chain."""
from __future__ import annotations

from ezoforge.sizing import CHARS_PER_TOKEN_JA, COMPRESSION, DOC_TOKENS, GIB

CURATE_WORKER_GIB = 1.0  # one curate worker process: Python, datatrove, a batch of documents
# bench/curate_bench.py, whole chain (filters, MinHash, dedup) on FineWeb JSONL, 1 worker, idle 2-core CPU
# (bench/RESULTS.md); wiki markup parsing and bz2 are not in that figure.
CURATE_MB_PER_WORKER_S = 1.57


def estimate(plan, step: str) -> dict:
    c = plan.recipe.curate
    text_bytes = plan.vol.chars * 3
    kept_bytes = plan.vol.curated_tokens * CHARS_PER_TOKEN_JA * 3
    signatures = plan.vol.chars / (DOC_TOKENS * CHARS_PER_TOKEN_JA) * c.dedup.num_buckets * \
        c.dedup.hashes_per_bucket * 8
    plan.sources["curate"] = (f"model: {CURATE_WORKER_GIB:g} GiB per worker (not measured); "
                              f"{CURATE_MB_PER_WORKER_S} MB of text per worker-second (measured: "
                              "bench/curate_bench.py on a 2-core CPU, FineWeb JSONL; wiki parsing not included)")
    unknown = bool(plan.vol.missing)
    if unknown:
        plan.notes["curate"] = "inputs not on disk: their size, so curate's disk and hours, are unknown"
    return {"gpu_gib": 0.0, "ram_gib": c.workers * CURATE_WORKER_GIB,
            "disk_gib": None if unknown else (kept_bytes / COMPRESSION + signatures) / GIB,
            "hours": None if unknown else text_bytes / (CURATE_MB_PER_WORKER_S * 1e6 * c.workers) / 3600}
