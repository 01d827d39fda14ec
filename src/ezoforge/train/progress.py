"""What a training run shows and leaves behind: metrics.jsonl, a rich progress bar with loss and tokens/s, loss.png."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import TrainerCallback

from ezoforge.logs import console
from ezoforge.records import atomic_path, write_jsonl


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """Logged rows (a torn last line from a kill is dropped), optionally only those up to a resumed step."""
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


class TrainLog(TrainerCallback):
    """One metrics row per logged step: step, loss, lr, tokens_per_s (non-padding tokens over the steps' compute
    time, so evals and saves don't count), step_s, grad_norm, and eval_loss merged in when the step was evaluated;
    a first row {step: 0, eval_loss} holds the untrained model's eval loss."""

    def __init__(self, path: Path, resume_step: int, main: bool = True,
                 columns: Callable[[dict[str, float]], dict[str, Any]] | None = None):
        self.path, self.main = path, main
        self.columns = columns  # a trainer's own figures as more columns of a step's row (GRPO's rewards)
        self.rows = read_metrics(path, resume_step)
        if main:  # steps logged after the resumed checkpoint will be trained again
            write_jsonl(path, self.rows)
        self.window_tokens = self.window_seconds = self.window_steps = 0
        self.bar: Progress | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.main:
            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                                TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task("train", total=state.max_steps, completed=state.global_step,
                                          loss="–", tps="–")
            self.bar.start()

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.window_seconds += time.perf_counter() - self.t0
        self.window_tokens += state.num_input_tokens_seen - self.tokens0
        self.window_steps += 1
        # An evaluated step and the last step are always logged, so every eval_loss has a row to join.
        if control.should_evaluate or state.global_step >= state.max_steps:
            control.should_log = True
        if self.bar:
            self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.main or not logs:
            return
        if "loss" in logs:
            tps = self.window_tokens / max(self.window_seconds, 1e-9)
            row = {"step": state.global_step, "loss": round(logs["loss"], 5), "lr": logs.get("learning_rate"),
                   "tokens_per_s": round(tps, 1), "step_s": round(self.window_seconds / max(self.window_steps, 1), 3),
                   "grad_norm": logs.get("grad_norm"), "epoch": round(state.epoch or 0.0, 4),
                   **(self.columns(logs) if self.columns else {})}
            self.window_tokens = self.window_seconds = self.window_steps = 0
            self.rows.append(row)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if self.bar:
                self.bar.update(self.task, loss=f"{row['loss']:.4f}", tps=f"{tps:,.0f}")
        elif "eval_loss" in logs:
            if not self.rows or self.rows[-1]["step"] != state.global_step:
                self.rows.append({"step": state.global_step})
            self.rows[-1]["eval_loss"] = round(logs["eval_loss"], 5)
            write_jsonl(self.path, self.rows)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar:
            self.bar.stop()


def plot_loss(rows: list[dict[str, Any]], path: Path) -> None:
    plot_steps(rows, [("loss", "train loss", {}), ("eval_loss", "eval loss", {"marker": "o"})], "loss", path)


def plot_steps(rows: list[dict[str, Any]], lines: list[tuple[str, str, dict]], ylabel: str, path: Path) -> None:
    """A PNG of metrics.jsonl columns by step: each (column, label, line style) drawn where it has values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, style in lines:
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), label=label, **style)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
