"""A stage in a module of its own: the worked example of ARCHITECTURE.md's "A stage". `pairstats` reads synth's
pairs and records how long their responses are. Its settings, its `ezo plan` estimate, its run and its sentence are
all here; `tests/test_new_stage.py` adds its one Step line."""
import json
from pathlib import Path

from pydantic import Field

from ezoforge.config import Operational, Section, output_settings
from ezoforge.records import read_rows
from ezoforge.stage import Stage, done_info, input_files


class PairStatsConfig(Section):
    min_chars: int = Field(1, ge=1)  # a response shorter than this is not counted
    log_every: Operational[int] = 100  # how it runs, not what it writes: a change never invalidates the folder


def run(recipe, out: Path, read: dict[str, Path], force: bool) -> dict:
    cfg = recipe.pairstats
    stage = Stage("pairstats", out, {"pairstats": output_settings(cfg)}, inputs=[read["synth"]])
    if (finished := stage.start(force)) is not None:
        return finished
    with stage.claimed():
        lengths = [len(row["response"]) for f in input_files([read["synth"]]) for _, row in read_rows(f)
                   if len(row["response"]) >= cfg.min_chars]
        (out / "data").mkdir(exist_ok=True)
        (out / "data" / "lengths.json").write_text(json.dumps(lengths))
        return stage.finish({"pairs": len(lengths), "mean_chars": round(sum(lengths) / max(1, len(lengths)), 1)})


def estimate(plan, step: str) -> dict:
    plan.sources["pairstats"] = "model: synth's pairs read once on the CPU"
    return {"gpu_gib": 0.0, "ram_gib": 0.5, "disk_gib": 0.0, "hours": plan.vol.requests / 1e6}


def summary(folder: Path) -> str:
    stats = done_info(folder).stats
    return f"{stats['pairs']} responses of {stats['mean_chars']} characters on average"
