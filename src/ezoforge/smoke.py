"""`ezo run RECIPE --smoke`: every stage of a recipe at a few documents, steps and tasks, on the recipe's own model,
card and engines, into a workdir of its own; then each stage's measured peak memory and rate beside what `ezo plan`
says for the whole run. A first hour that shows whether the plan holds before the long stages start.

The cuts change only how much work each stage does, never how it does it: the model, quantization, engines,
lengths, LoRA, batch shapes and judging protocol stay as written, so the peaks are the real run's. One caveat:
training peaks at its longest packed row, and a few documents may not fill a row to max_length, so its figure can
fall short of the real run's (train's stats.json gives the rows' packing).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ezoforge.config import Recipe, deep_merge, parse_overrides
from ezoforge.plan import card_here, plan
from ezoforge.records import write_json
from ezoforge.stages import STEPS

log = logging.getLogger(__name__)

# How much of each stage a smoke run does at most (a recipe that states less keeps its own).
CUTS = {"curate.limit": 64, "synth.limit": 4, "train.max_steps": 2, "train.epochs": None, "train.eval_every": 2,
        "train.save_every": 2, "prefer.limit": 4, "prefer.max_steps": 2, "reinforce.limit": 4, "reinforce.held_out": 1,
        "reinforce.max_steps": 2, "eval.limit": 2}
def smoke_recipe(recipe: Recipe) -> Recipe:
    """The recipe cut to a few documents, steps and tasks, into `WORKDIR-smoke`: the real run's folders are never
    touched, and the real run never mistakes a smoke folder for its own."""
    # Only what the recipe states is carried over, so settings left to `auto` stay unstated (a stated one is required).
    stated = json.loads(recipe.model_dump_json(exclude_unset=True))
    cuts = []
    for key, most in CUTS.items():
        section, name = key.split(".")
        value = stated.get(section, {}).get(name)
        keep = most is not None and isinstance(value, int) and value <= most
        cuts.append(f"{key}={value if keep else 'null' if most is None else most}")
    cut = deep_merge(stated, parse_overrides(cuts))
    cut["workdir"] = f"{str(recipe.workdir).rstrip('/')}-smoke"
    return type(recipe).model_validate(cut)


def compare(recipe: Recipe, workdir: Path, ram_gib: float, card: str | None) -> dict:
    """Each stage's measured peaks and rate (timings.json, stats.json) beside `ezo plan`'s figures for the full
    recipe on `card` (h100 when the card is unknown: its GPU column is then the plan's, not this machine's)."""
    planned = plan(recipe, card or "h100", ram_gib=ram_gib)
    timings = json.loads((workdir / "timings.json").read_text(encoding="utf-8"))
    rows = {}
    for step, est in planned["stages"].items():
        measured = timings.get(step, {})
        stats_path = workdir / STEPS[step].folder / "stats.json"
        stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.exists() else {}
        rate, plan_rate = stats.get("tokens_per_s"), est.get("tokens_per_s")  # train's, synth's and eval's
        rows[step] = {
            "seconds": measured.get("seconds"),
            "peak_gpu_gib": measured.get("peak_gpu_gib"), "plan_gpu_gib": est["gpu_gib"],
            "peak_ram_gib": measured.get("peak_ram_gib"), "plan_ram_gib": est["ram_gib"],
            "tokens_per_s": rate, "plan_tokens_per_s": plan_rate,
            # Over the plan's memory is what a user must hear before the long run: the run would not fit as planned.
            # Without a card the plan (a GPU run's) is shown for reference only: the CPU holds what a card would.
            "within_plan": None if card is None else _within(measured.get("peak_gpu_gib"), est["gpu_gib"]) and
            _within(measured.get("peak_ram_gib"), est["ram_gib"] + planned["run_ram_gib"]),
        }
    return {"card": card, "plan_card": planned["card"], "stages": rows,
            "within_plan": None if card is None else all(r["within_plan"] for r in rows.values())}


def _within(measured: float | None, planned: float) -> bool:
    return measured is None or measured <= planned


def run_smoke(recipe: Recipe, recipe_path: Path | None, ram_gib: float, force: list[str] = ()) -> dict:
    """Run the cut recipe, then write `smoke.json` in its workdir and print the comparison."""
    from ezoforge.pipeline import run_recipe

    cut = smoke_recipe(recipe)
    card = card_here()
    if card is None:
        log.info("smoke: no known card found by nvidia-smi; GPU figures are compared with the plan for an h100")
    run_recipe(cut, recipe_path, force=force)
    result = compare(recipe, Path(cut.workdir), ram_gib, card)
    write_json(Path(cut.workdir) / "smoke.json", result)
    _print(result)
    return result


def _print(result: dict) -> None:
    from rich.table import Table

    from ezoforge.logs import console

    def pair(measured, planned) -> str:
        return f"{'—' if measured is None else measured} / {'—' if planned is None else planned}"

    table = Table(title=f"ezo run --smoke: measured / planned (plan for {result['plan_card']})")
    for col in ("stage", "seconds", "GPU GiB", "RAM GiB", "tokens/s", "within plan"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for step, r in result["stages"].items():
        table.add_row(step, f"{r['seconds']}", pair(r["peak_gpu_gib"], r["plan_gpu_gib"]),
                      pair(r["peak_ram_gib"], r["plan_ram_gib"]), pair(r["tokens_per_s"], r["plan_tokens_per_s"]),
                      {True: "yes", False: "NO", None: "—"}[r["within_plan"]])
    console.print(table)
    verdict = {True: "every stage within the plan's memory",
               False: "a stage took more memory than planned: the full run may not fit as planned",
               None: "no card here: the plan's figures (for an h100) are shown for reference, not checked"}
    console.print(verdict[result["within_plan"]], highlight=False)
