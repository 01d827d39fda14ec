"""`ezo run`: the recipe's stages in order, each in its own folder under the workdir.

A stage whose DONE marker matches its settings is skipped (each stage checks that itself), so a killed
run continues where it stopped. A stage whose output-shaping settings were edited is refused, naming the keys,
and nothing is deleted: `--force STAGE` redoes that stage and every stage after it, `--force` the whole recipe.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ezoforge.config import Recipe
from ezoforge.errors import ConfigError
from ezoforge.records import write_json
from ezoforge.stage import done_info

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


def run_step(step: str, recipe: Recipe, workdir: Path, force: bool = False) -> dict:
    out = workdir / FOLDERS[step]
    if step == "curate":
        from ezoforge.curate.run import run
        return run(recipe, recipe.curate.inputs, out, force=force)
    if step == "synth":
        from ezoforge.synth.run import run
        return run(recipe, workdir / "curate", out, force=force)
    if step == "train":
        from ezoforge.train.run import run
        return run(recipe, [workdir / "synth"], out, force=force)
    if step == "merge":
        from ezoforge.train.merge import run
        return run(workdir / "train", out, recipe.merge.dtype, force=force)
    if step == "export":
        from ezoforge.export.run import run
        return run(workdir / "merged", out, recipe.export, recipe.model.system_prompt, force=force)
    from ezoforge.eval.run import run
    if step == "eval-base":
        return run(recipe, out, force=force)
    tuned = recipe.model_copy(deep=True)
    if "merge" in recipe.stages:
        tuned.model.name = str(workdir / "merged")
        return run(tuned, out, force=force)
    return run(recipe, out, adapter=workdir / "train" / "adapter", force=force)


ALL = "all"
# Which steps read each step's folder: redoing a step redoes these after it (eval-base reads only the base model).
READERS = {"curate": ["synth"], "synth": ["train"], "train": ["merge", "eval-tuned"],
           "merge": ["eval-tuned", "export"], "eval-base": ["export"], "eval-tuned": ["export"], "export": []}


def forced_steps(plan: list[str], force: list[str]) -> set[str]:
    """`--force` (all) or `--force STAGE…`: those stages and every stage after them that reads their output
    (`eval` names both evals)."""
    if not force:
        return set()
    if ALL in force:
        return set(plan)
    names = {step: [step] for step in plan} | {"eval": [s for s in plan if s.startswith("eval-")]}
    unknown = [f for f in force if f not in names or not names[f]]
    if unknown:
        raise ConfigError(f"--force {unknown[0]}: not a stage of this recipe (stages: {', '.join(plan)})")
    todo, redo = [s for f in force for s in names[f]], set()
    while todo:
        step = todo.pop()
        if step in plan and step not in redo:
            redo.add(step)
            todo += READERS[step]
    return redo


def run_recipe(recipe: Recipe, recipe_path: Path | None = None, force: list[str] = ()) -> dict:
    workdir = Path(recipe.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"{recipe_path or 'recipe'}: workdir {workdir} exists and is not a folder")
    plan = steps(recipe)
    redo = forced_steps(plan, list(force))
    workdir.mkdir(parents=True, exist_ok=True)
    timings_path = workdir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    console.rule(f"ezo run {recipe_path or ''} → {workdir}")
    results = {}
    for i, step in enumerate(plan, 1):
        folder = workdir / FOLDERS[step]
        was_done = done_info(folder) is not None and step not in redo
        console.rule(f"[{i}/{len(plan)}] {step}" + (" (--force: redo)" if step in redo else ""))
        start = time.perf_counter()
        results[step] = run_step(step, recipe, workdir, force=step in redo)
        seconds = time.perf_counter() - start
        marker = done_info(folder) or {}
        # A skipped stage keeps the time it took when it really ran.
        if not (was_done and timings.get(step, {}).get("fingerprint") == marker.get("fingerprint")):
            timings[step] = {"seconds": round(seconds, 1), "fingerprint": marker.get("fingerprint")}
            write_json(timings_path, timings)
        else:
            console.print(f"[dim]{step}: already done with these settings, skipped[/dim]")
    from ezoforge.recipe_report import write_run_report

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
