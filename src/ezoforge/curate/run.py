"""`ezo curate`: raw corpora -> clean, deduplicated Japanese documents, as four datatrove passes.

1. filter (one task per input shard): read -> NFKC -> Japanese filters -> kept shard + MinHash signatures;
   dropped documents go to rejected/ with the filter's reason.
2. buckets (one task per LSH band): datatrove finds the duplicate pairs.
3. cluster (one task): keep the first document of each cluster in input order.
4. dedup (one task per shard): drop the other members (rejected/, reason `duplicate`), write data/.

Output: data/*.parquet, rejected/*.parquet, stats.json, filters.png, config.yaml, DONE (last). Work files live
in .work/ (datatrove's completion markers per task, so a killed run resumes where it stopped) and are deleted
once DONE is written. The output does not depend on the number of workers, so --workers may change on resume.

Scaling out (`curate.executor` in the recipe; the output folder must be on storage every node sees):
    curate:
      workers: 64                 # concurrent tasks (local processes, Slurm array slots, Ray tasks)
      split_mb: 256               # big inputs (a whole jawiki dump) are read by ceil(size / split_mb) tasks
      executor: {kind: slurm, partition: cpu, time: "12:00:00", venv_path: /shared/venv, mem_per_cpu_gb: 4}
With `slurm`, `ezo curate` submits the four passes as dependent job arrays and exits; run the same command
again once they have finished (squeue) to write stats.json, filters.png and DONE. With `ray`
(`pip install 'ezoforge[dist]'`, then `ray start` or RAY_ADDRESS) it runs the passes on the cluster and waits.
"""
from __future__ import annotations

import glob
import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupFilter
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ezoforge.config import Recipe, bundled_data, output_settings
from ezoforge.curate.dedup import CharMinhashSignature, FirstInOrderCluster, minhash_config
from ezoforge.curate.ja_filters import build_chain
from ezoforge.curate.readers import DropMalformed, Shard, ShardReader, plan_shards
from ezoforge.curate.settings import CurateConfig
from ezoforge.curate.writers import KeptReader, ParquetSink
from ezoforge.errors import EzoError, RecordError
from ezoforge.executors import check_shared_storage, completed, executor, launch, pending_jobs
from ezoforge.logs import console
from ezoforge.records import CORPUS_SUFFIXES, atomic_path, files_under
from ezoforge.report_kit import counts, pct, plural, size_or_dash
from ezoforge.stage import Stage, done_info, input_files, is_stage_folder



def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files in the order given; a glob expands sorted, a directory to its supported files (sorted), and
    `bundled:web/fineweb-demo.parquet` to the file shipped with ezoforge."""
    files: list[Path] = []
    for pattern in map(bundled_data, patterns):
        if is_stage_folder(pattern):  # an earlier stage's output: its data/ only, never rejected/ or work files
            found = input_files([pattern])
        elif Path(pattern).is_dir():
            found = files_under(pattern, CORPUS_SUFFIXES)
        elif glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        else:
            found = [Path(pattern)]
        if not found:
            raise RecordError(f"{pattern}: no input files match")
        files += [p.resolve() for p in found if p.resolve() not in files]
    if not files:
        raise EzoError("no inputs: give INPUT files or set curate.inputs in the recipe")
    return files


def run(recipe: Recipe, inputs: list[str], out: Path, force: bool = False, allow_empty: bool = False) -> dict[str, Any]:
    cfg = recipe.curate
    patterns = list(inputs) or cfg.inputs
    files = expand_inputs(patterns)
    shards = plan_shards(files, cfg.split_mb, cfg.limit)
    # The folders too: an output folder inside one is refused (their data files are among `files`).
    folders = [Path(bundled_data(p)) for p in patterns if Path(bundled_data(p)).is_dir()]
    check_shared_storage(out, cfg.executor, "curate.executor.kind")
    stage = Stage("curate", out, {"curate": output_settings(cfg)}, inputs=[*folders, *files])
    done = stage.start(force)
    if done is not None:
        console.print(f"{out} is already curated with these settings: nothing to do")
        return done
    with stage.claimed():
        for stale in [*Path(out).glob("data/.*.tmp"), *Path(out).glob("rejected/.*.tmp")]:
            stale.unlink()  # a killed task's unfinished file; the task runs again
        work = Path(out) / ".work"
        started = time.perf_counter()
        passes = _passes(cfg, shards, Path(out), work)
        pending = _execute(passes, cfg, work)
        if pending:
            stage.hold(f"Slurm jobs {', '.join(pending)}")
            raise EzoError(f"submitted the curate passes to Slurm as jobs {', '.join(pending)} (logs in "
                           f"{work / 'logs'}); run the same command again once they have finished to write "
                           "stats.json and DONE")
        stats = _stats(Path(out), work, files, shards, time.perf_counter() - started)
        if stats["docs_out"] == 0 and not allow_empty:  # no DONE: the finished passes are kept for a rerun
            removed = ", ".join(f"{k} {v}" for k, v in stats["removed_by_filter"].items()) or "nothing read"
            raise EzoError(f"curate: 0 of {stats['docs_in']} documents kept (removed by: {removed}); nothing for synth "
                           "to use — check the inputs or the filters, or pass --allow-empty")
        _plot(stats, Path(out) / "filters.png")
        stage.finish(stats)
        shutil.rmtree(work, ignore_errors=True)
    return stats


# ---------------------------------------------------------------- the passes

def _passes(cfg: CurateConfig, shards: list[Shard], out: Path, work: Path) -> list[tuple[str, list, int]]:
    """(name, pipeline, tasks) for each pass, in order."""
    dedup = cfg.dedup.enabled
    rejected = ParquetSink(str(out / "rejected"), "-filter", rejected_reason="filtered")
    steps = [ShardReader(shards, str(work / "read"), cfg.on_error, cfg.limit), DropMalformed(exclusion_writer=rejected),
             *build_chain(cfg.filters, cfg.normalize, rejected)]
    if not dedup:
        return [("filter", steps + [ParquetSink(str(out / "data"))], len(shards))]
    mh = minhash_config(cfg.dedup)
    steps += [ParquetSink(str(work / "kept"), passthrough=True), CharMinhashSignature(str(work / "sigs"), mh)]
    duplicates = ParquetSink(str(out / "rejected"), "-duplicate", rejected_reason="duplicate")
    return [
        ("filter", steps, len(shards)),
        ("buckets", [MinhashDedupBuckets(str(work / "sigs"), str(work / "dups"), config=mh)], cfg.dedup.num_buckets),
        ("cluster", [FirstInOrderCluster(str(work / "dups"), str(work / "kept"), str(work / "remove"),
                                         [s.file_index for s in shards])], 1),
        ("dedup", [KeptReader(str(work / "kept")), MinhashDedupFilter(str(work / "remove"), exclusion_writer=duplicates),
                   ParquetSink(str(out / "data"))], len(shards)),
    ]


def _execute(passes: list[tuple[str, list, int]], cfg: CurateConfig, work: Path) -> list[str]:
    """Run the passes (local, Ray) or submit them (Slurm); the Slurm jobs still to finish ([] once all are done)."""
    ex = cfg.executor
    if ex.kind == "local":
        with _PassProgress(passes, work):
            for name, pipeline, tasks in passes:
                launch(executor(ex, "curate.executor.kind", pipeline, tasks, cfg.workers, work / "logs" / name, name),
                       ex, "curate.executor.kind")
        return []
    previous, executors = None, []
    for name, pipeline, tasks in passes:
        previous = executor(ex, "curate.executor.kind", pipeline, tasks, cfg.workers, work / "logs" / name, name,
                            depends=previous)
        executors.append(previous)
    launch(previous, ex, "curate.executor.kind")  # the chain of dependent passes; finished tasks are skipped
    if all(completed(work / "logs" / name) >= tasks for name, _, tasks in passes):
        return []
    return pending_jobs(executors)


class _PassProgress:
    """A rich progress bar per pass, fed by datatrove's completion markers (works with any worker count)."""

    def __init__(self, passes: list[tuple[str, list, int]], work: Path):
        self.work = work
        self.bar = Progress(TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("tasks"), TimeElapsedColumn(), console=console)
        self.ids = {name: self.bar.add_task(name, total=tasks) for name, _, tasks in passes}
        self.stop = threading.Event()

    def refresh(self) -> None:
        for name, task_id in self.ids.items():
            self.bar.update(task_id, completed=completed(self.work / "logs" / name))

    def poll(self) -> None:
        while not self.stop.wait(0.5):
            self.refresh()

    def __enter__(self):
        self.bar.start()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.refresh()
        self.bar.stop()


# ---------------------------------------------------------------- stats and plot

def _stats(out: Path, work: Path, files: list[Path], shards: list[Shard], seconds: float) -> dict[str, Any]:
    reads = [json.loads((work / "read" / f"{rank:05d}.json").read_text()) for rank in range(len(shards))]
    removed: Counter = Counter()
    for path in sorted((out / "rejected").glob("*.parquet")):
        removed.update(pq.read_table(path, columns=["reason"]).column("reason").to_pylist())
    docs_out = bytes_out = 0
    for path in sorted((out / "data").glob("*.parquet")):
        text = pq.read_table(path, columns=["text"]).column("text")
        docs_out += len(text)
        bytes_out += pc.sum(pc.binary_length(text)).as_py() or 0
    docs_in = sum(r["docs_in"] for r in reads)
    if docs_out + sum(removed.values()) != docs_in:  # the promise that nothing vanishes, checked
        raise RuntimeError(f"{out}: {docs_in} documents read but {docs_out} kept + {sum(removed.values())} rejected")
    skipped: Counter = Counter()
    for r in reads:
        skipped.update(r["pages_skipped"])
    return {
        "docs_in": docs_in, "docs_out": docs_out,
        "bytes_in": sum(r["bytes_in"] for r in reads), "bytes_out": bytes_out,
        "removed_by_filter": dict(sorted(removed.items(), key=lambda kv: -kv[1])),
        "pages_skipped": dict(skipped),
        "seconds": round(seconds, 3), "docs_per_s": round(docs_in / seconds, 1) if seconds else None,
        # the read+filter+signature tasks, summed (wall and CPU): bytes_in / cpu seconds is the per-core rate
        "filter_task_seconds": round(sum(r["seconds"] for r in reads), 3),
        "filter_cpu_seconds": round(sum(r["cpu_seconds"] for r in reads), 3),
        "inputs": [str(f) for f in files], "tasks": len(shards),
    }


def _plot(stats: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    removed = stats["removed_by_filter"]
    labels = ["kept", *removed]
    counts = [stats["docs_out"], *removed.values()]
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(labels) + 1.2))
    bars = ax.barh(labels[::-1], counts[::-1], color=["#c44e52"] * len(removed) + ["#4c72b0"])
    ax.bar_label(bars, padding=2)
    ax.set_xlabel("documents")
    ax.set_title(f"curate: {stats['docs_out']} of {stats['docs_in']} documents kept")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def summary(folder: Path) -> str:
    """The stage in one sentence, from its finished folder: what `ezo curate` prints and the run report shows."""
    s = done_info(folder).stats
    share = s["docs_out"] / s["docs_in"] if s.get("docs_in") else None
    return (f"kept {s.get('docs_out')} of {plural(s.get('docs_in'), 'document')} ({pct(share)}), "
            f"{size_or_dash(s.get('bytes_out'))} of text (removed: {counts(s.get('removed_by_filter'))})")
