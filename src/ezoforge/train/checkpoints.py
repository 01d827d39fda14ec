"""Atomic checkpoints: the Trainer writes each one into a staging folder; we stamp it with the stage's settings and
fingerprint (stage.Stage) and a COMPLETE marker, then rename it into DIR/checkpoints/step-NNNNNN and keep the last
K. A killed save leaves only staging debris, never a checkpoint that looks complete."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import TrainerCallback

from ezoforge.errors import ConfigError
from ezoforge.records import replace_folder, write_json
from ezoforge.stage import Stage, changed_keys

STAGING = ".staging"
COMPLETE = "COMPLETE"
INFO = "ezo-checkpoint.json"


def complete(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in folder.glob("step-*") if (p / COMPLETE).exists()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest(folder: Path) -> Path | None:
    found = complete(folder)
    return found[-1] if found else None


def clean(folder: Path) -> None:
    """Remove what a killed run left half written: the staging folder and unmarked checkpoints."""
    shutil.rmtree(folder / STAGING, ignore_errors=True)
    for p in folder.glob("step-*") if folder.is_dir() else []:
        if not (p / COMPLETE).exists():
            shutil.rmtree(p)


def info(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / INFO).read_text(encoding="utf-8"))


def check(checkpoint: Path, stage: Stage) -> int:
    """The checkpoint's step; refuses one written under other settings than the stage's, naming the keys that
    differ."""
    saved = info(checkpoint)
    if saved["fingerprint"] != stage.fingerprint:
        keys = changed_keys(saved["settings"], stage.settings)
        raise ConfigError(f"{checkpoint} was written with other settings (differ: {', '.join(keys)}); "
                          "rerun with the same settings to resume, or use --force to start over")
    return int(saved["step"])


class AtomicCheckpoints(TrainerCallback):
    """Finalizes each checkpoint the Trainer has just written into `folder/.staging/checkpoint-N`."""

    def __init__(self, folder: Path, stage: Stage, keep: int, rows: int):
        self.folder, self.stage, self.keep, self.rows = folder, stage, keep, rows

    def on_save(self, args, state, control, **kwargs):
        dist = PartialState()
        dist.wait_for_everyone()  # every rank has written its part
        if dist.is_main_process:
            self._finalize(Path(args.output_dir) / f"checkpoint-{state.global_step}", state, args)
        dist.wait_for_everyone()

    def _finalize(self, staged: Path, state, args) -> None:
        rows_seen = state.global_step * args.gradient_accumulation_steps * args.per_device_train_batch_size
        write_json(staged / INFO, {
            "step": state.global_step, "epoch": state.epoch,
            "data_position": {"rows_seen": rows_seen * args.world_size, "rows_per_epoch": self.rows},
            "fingerprint": self.stage.fingerprint, "settings": self.stage.settings})
        (staged / COMPLETE).write_text(f"{state.global_step}\n", encoding="utf-8")
        replace_folder(staged, self.folder / f"step-{state.global_step:06d}")
        for old in complete(self.folder)[:-self.keep]:
            (old / COMPLETE).unlink()  # first, so a kill mid-delete leaves no "complete" half checkpoint
            shutil.rmtree(old)
