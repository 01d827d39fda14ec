"""What a run recorded about the model it made, found by following each folder's own pointers.

merged/config.yaml names the train folder; train/config.yaml lists its inputs (synth folders); synth/config.yaml
fingerprints the curate shards it read (`path:size:mtime`); eval-base/eval-tuned sit beside merged in the workdir.
Anything missing stays missing: the card leaves it out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ezoforge.records import DONE


def _stage(folder: Path) -> dict[str, Any] | None:
    """A finished stage folder's settings and stats (None when it is not one)."""
    marker = folder / DONE
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text(encoding="utf-8"))
    stats_path = folder / "stats.json"
    stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.exists() else done.get("stats", {})
    settings = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) \
        if (folder / "config.yaml").exists() else done.get("settings", {})
    return {"dir": folder, "stage": done.get("stage"), "fingerprint": done.get("fingerprint"),
            "settings": settings or {}, "stats": stats or {}}


def _locate(recorded: str, near: Path) -> Path:
    """A path a stage recorded (often relative to where the run started), or its namesake beside `near`."""
    path = Path(recorded)
    return path if path.exists() else near / path.name


@dataclass
class RunRecords:
    merged_dir: Path
    merged: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    synth: list[dict[str, Any]] = field(default_factory=list)
    curate: list[dict[str, Any]] = field(default_factory=list)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # "base"/"tuned" -> report.json

    @property
    def base_model(self) -> str | None:
        if self.merged and self.merged["settings"].get("base"):
            return self.merged["settings"]["base"]
        return (self.train or {}).get("settings", {}).get("model", {}).get("name")

    @property
    def system_prompt(self) -> str | None:
        model = (self.train or {}).get("settings", {}).get("model", {})
        return model.get("system_prompt") if "system_prompt" in model else None

    def folders(self) -> list[Path]:
        """Every record folder the card reads, for the export's fingerprint."""
        stages = [self.merged, self.train, *self.synth, *self.curate]
        return [s["dir"] for s in stages if s] + [self.merged_dir.parent / f"eval-{k}" for k in self.evals]


def gather(merged: Path) -> RunRecords:
    merged = Path(merged)
    rec = RunRecords(merged, _stage(merged))
    if rec.merged and rec.merged["settings"].get("train"):
        rec.train = _stage(_locate(rec.merged["settings"]["train"], merged.parent))
    for inp in (rec.train or {}).get("settings", {}).get("inputs", []):
        synth = _stage(_locate(inp, merged.parent))
        if synth and synth["stage"] == "synth":
            rec.synth.append(synth)
    seen: set[Path] = set()
    for synth in rec.synth:
        for item in synth["settings"].get("inputs", []):
            shard = Path(str(item).rsplit(":", 2)[0])  # "…/curate/data/part-00000.parquet:size:mtime"
            folder = _locate(str(shard.parent.parent), merged.parent)
            curate = _stage(folder) if folder not in seen else None
            seen.add(folder)
            if curate and curate["stage"] == "curate":
                rec.curate.append(curate)
    # An eval beside the merged folder counts only when it evaluated this model (tuned) or its base (base).
    for kind, model in (("base", rec.base_model), ("tuned", str(merged))):
        report = merged.parent / f"eval-{kind}" / "report.json"
        if model and report.is_file() and (report.parent / DONE).is_file():
            data = json.loads(report.read_text(encoding="utf-8"))
            spec = data.get("model", {}).get("spec", "")
            if spec == model or (Path(spec).exists() and Path(spec).resolve() == Path(model).resolve()):
                rec.evals[kind] = data
    return rec
