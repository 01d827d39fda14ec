"""What a run recorded about the model it made, found by following each folder's own pointers.

Every finished stage folder's DONE marker lists the inputs it read (`inputs`), which `stage.lineage` follows:
merged → (reinforce →) (prefer →) train → synth → curate, or any chain with other stages between. The evals are the
folders the caller names (in a workdir, the eval steps' folders beside merged). Anything missing stays missing: the
card leaves it out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ezoforge.models import folder_digest, split_revision
from ezoforge.records import Done, read_eval_report
from ezoforge.stage import done_info, lineage


def _view(folder: Path, done: Done) -> dict[str, Any]:
    """A finished stage folder as the card reads it: its output settings, model, stats and inputs."""
    return {"dir": Path(folder), "stage": done.stage, "fingerprint": done.fingerprint,
            "output": done.settings.get("output") or {}, "model": done.settings.get("model") or {},
            "stats": done.stats, "inputs": [Path(p) for p in done.inputs]}


@dataclass
class RunRecords:
    merged_dir: Path
    merged: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    prefer: dict[str, Any] | None = None  # DPO after the SFT: the merged adapter is the SFT adapter continued
    reinforce: dict[str, Any] | None = None  # GRPO after the SFT (or DPO)
    chain: list[dict[str, Any]] = field(default_factory=list)  # every folder of the lineage, nearest first
    synth: list[dict[str, Any]] = field(default_factory=list)
    curate: list[dict[str, Any]] = field(default_factory=list)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # "base"/"sft"/"tuned" -> report.json
    eval_dirs: dict[str, Path] = field(default_factory=dict)  # the folders of those reports
    pairwise: dict[str, Any] | None = None  # the head-to-head verdicts between those evals (pairwise.json)
    pairwise_dir: Path | None = None

    @property
    def base_model(self) -> str | None:
        if self.merged and self.merged["model"].get("name"):
            return self.merged["model"]["name"]
        return (self.train or {}).get("model", {}).get("name")

    @property
    def system_prompt(self) -> str | None:
        model = (self.train or {}).get("model", {})
        return model.get("system_prompt") if "system_prompt" in model else None

    def folders(self) -> list[Path]:
        """Every record folder the card reads, for the export's fingerprint."""
        return [s["dir"] for s in self.chain] + [self.eval_dirs[k] for k in self.evals] + \
            ([self.pairwise_dir] if self.pairwise_dir else [])


def gather(merged: Path, evals: dict[str, Path]) -> RunRecords:
    """The records behind `merged`, and the reports among `evals` ("base"/"sft"/"tuned" -> an eval folder) that
    evaluated it or its base. The folders come from `stage.lineage`, whatever stages the chain holds: the SFT is
    the nearest train folder, the tuned adapter the folder the merge read."""
    merged = Path(merged)
    chain = [_view(p, d) for p, d in lineage(merged)]
    rec = RunRecords(merged, chain[0] if chain else None, chain=chain)

    def nearest(stage: str) -> dict[str, Any] | None:
        return next((s for s in chain if s["stage"] == stage), None)

    rec.train, rec.prefer, rec.reinforce = nearest("train"), nearest("prefer"), nearest("reinforce")
    rec.synth = [s for s in chain if s["stage"] == "synth"]
    rec.curate = [s for s in chain if s["stage"] == "curate"]
    read = [s for s in chain[1:] if rec.merged and s["dir"].resolve() in {p.resolve() for p in rec.merged["inputs"]}]
    tuned = read[0] if read else rec.train
    # An eval counts only when it evaluated this model (tuned) or its base (base): (spec, adapter) pairs it may have
    # scored. With a prefer stage, eval-sft evaluated the base with the SFT adapter (before DPO). The tuned model is
    # the merge, or the base with the merged adapter where eval quantized the base (eval.run.scores_adapter).
    base = rec.base_model
    adapter = {name: s["dir"] / "adapter" for name, s in (("sft", rec.train), ("tuned", tuned)) if s}
    after_sft = tuned is not None and tuned is not rec.train  # DPO (or another stage) continued the SFT adapter
    scored = {"base": [(base, None)], "sft": [(base, adapter.get("sft"))] if after_sft else [],
              "tuned": [(str(merged), None)] + ([(base, adapter["tuned"])] if "tuned" in adapter else [])}
    for kind, forms in scored.items():
        report = Path(evals[kind]) / "report.json" if kind in evals else None
        if report and report.is_file() and done_info(report.parent) is not None:
            data = read_eval_report(report)
            model = data["model"]
            # A hub base is recorded as loaded: at the revision train pinned (`org/name@COMMIT`).
            recorded = split_revision(model.get("spec") or "")[0]
            if any(spec and _same(recorded, spec) and _same(model.get("adapter"), a) for spec, a in forms):
                rec.evals[kind], rec.eval_dirs[kind] = data, report.parent
    # The head-to-head verdicts count when they compared exactly the evals the card shows.
    pairwise = Path(evals["pairwise"]) if "pairwise" in evals else None
    info = done_info(pairwise) if pairwise else None
    if info and {Path(p).resolve() for p in info.inputs} == {d.resolve() for d in rec.eval_dirs.values()}:
        rec.pairwise = json.loads((pairwise / "pairwise.json").read_text(encoding="utf-8"))
        rec.pairwise_dir = pairwise
    return rec


def _same(recorded: str | None, expected: str | Path | None) -> bool:
    """A model or adapter as a report recorded it is the one expected: the same id or path, or, for a run folder
    moved or copied since, an adapter folder with the same files."""
    if recorded is None or expected is None:
        return recorded is None and expected is None
    if recorded == str(expected):
        return True
    here, there = Path(recorded), Path(expected)
    if not (here.exists() and there.exists()):
        return False
    return here.resolve() == there.resolve() or (here.is_dir() and there.is_dir() and
                                                  folder_digest(here) == folder_digest(there))
