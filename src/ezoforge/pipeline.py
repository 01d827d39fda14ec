"""`ezo run`: the recipe's stages in order, each in its own folder under the workdir.

A stage whose DONE marker matches its settings is skipped (each stage checks that itself), so a killed
run continues where it stopped; a stage's settings include its inputs' fingerprints, so editing one
stage reruns it and the stages after it only.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ezoforge.config import Recipe
from ezoforge.records import DONE, write_json

console = Console(stderr=True)

# Folder of each step under the workdir, in run order.
FOLDERS = {"curate": "curate", "synth": "synth", "train": "train", "merge": "merged",
           "eval-base": "eval-base", "eval-tuned": "eval-tuned", "export": "export"}


def steps(recipe: Recipe) -> list[str]:
    """The recipe's stages as pipeline steps; eval runs twice (base, then tuned when there is a tuned model)."""
    out = []
    for stage in recipe.stages:
        if stage == "eval":
            out.append("eval-base")
            if "train" in recipe.stages or "merge" in recipe.stages:
                out.append("eval-tuned")
        else:
            out.append(stage)
    return sorted(out, key=lambda s: s == "export")  # export last: its card reads the evals


def run_step(step: str, recipe: Recipe, workdir: Path) -> dict:
    out = workdir / FOLDERS[step]
    if step == "curate":
        from ezoforge.curate.run import run
        return run(recipe, recipe.curate.inputs, out, force=True)
    if step == "synth":
        from ezoforge.synth.run import run
        return run(recipe, workdir / "curate", out, force=True)
    if step == "train":
        from ezoforge.train.run import run
        return run(recipe, [workdir / "synth"], out, force=True)
    if step == "merge":
        from ezoforge.train.merge import run
        return run(workdir / "train", out, recipe.merge.dtype, force=True)
    if step == "export":
        from ezoforge.export.run import run
        return run(workdir / "merged", out, recipe.export, recipe.model.system_prompt, force=True)
    from ezoforge.eval.run import run
    if step == "eval-base":
        return run(recipe, out, force=True)
    tuned = recipe.model_copy(deep=True)
    if "merge" in recipe.stages:
        tuned.model.name = str(workdir / "merged")
        return run(tuned, out, force=True)
    return run(recipe, out, adapter=workdir / "train" / "adapter", force=True)


def run_recipe(recipe: Recipe, recipe_path: Path | None = None, force: bool = False) -> dict:
    workdir = Path(recipe.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timings_path = workdir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    plan = steps(recipe)
    if force:
        for step in plan:
            (workdir / FOLDERS[step] / DONE).unlink(missing_ok=True)
    console.rule(f"ezo run {recipe_path or ''} → {workdir}")
    results = {}
    for i, step in enumerate(plan, 1):
        folder = workdir / FOLDERS[step]
        was_done = (folder / DONE).exists()
        console.rule(f"[{i}/{len(plan)}] {step}")
        start = time.perf_counter()
        results[step] = run_step(step, recipe, workdir)
        seconds = time.perf_counter() - start
        marker = json.loads((folder / DONE).read_text(encoding="utf-8"))
        # A skipped stage keeps the time it took when it really ran.
        if not (was_done and timings.get(step, {}).get("fingerprint") == marker.get("fingerprint")):
            timings[step] = {"seconds": round(seconds, 1), "fingerprint": marker.get("fingerprint")}
            write_json(timings_path, timings)
        else:
            console.print(f"[dim]{step}: already done with these settings, skipped[/dim]")
    from ezoforge.run_report import write_run_report

    report = write_run_report(workdir, plan, timings)
    _print_summary(report)
    return report


def _print_summary(report: dict) -> None:
    table = Table(title="ezo run — summary")
    table.add_column("stage")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    for step, info in report["stages"].items():
        table.add_row(step, info.get("summary", ""), f"{info.get('seconds', 0):.0f}")
    console.print(table)
    console.print(f"report: {report['paths']['html']}")
