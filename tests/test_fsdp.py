"""`ezo train` on two CPU processes with FSDP really on (`accelerate launch` with recipes/accelerate-fsdp-cpu.yaml:
FSDP2 over gloo): each rank holds half the parameters, the losses are a one-process run's with the same global batch,
the adapter merges like any other, and a run killed after a checkpoint resumes to the same losses. QLoRA under FSDP
needs CUDA (bitsandbytes' 4-bit storage sharded by FSDP): not proven here."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from ezoforge.stages import load_recipe
from ezoforge.train import merge
from ezoforge.train import run as train_run
from trainkit import assert_merge_equals_peft, elyza_rows, overrides, tiny_model  # noqa: F401  (fixtures)

CPU_FSDP = Path(__file__).resolve().parents[1] / "recipes" / "accelerate-fsdp-cpu.yaml"
# Two processes sum their gradients in another order than one process does over the same rows.
LOSS_TOLERANCE = 1e-3


def launch(model: str, rows: Path, out: Path, **train) -> subprocess.Popen:
    sets = [a for o in overrides(model, **train) for a in ("--set", o)]
    return subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_FSDP),
                             "--num_processes", "2", "-m", "ezoforge", "train", str(rows), "--out", str(out), *sets],
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow  # two processes and one more beside them (~25 s of the 8-minute suite); `make test-all`
def test_fsdp_on_two_processes_shards_the_model_and_trains_as_one_process(tiny_model, elyza_rows, tmp_path):  # noqa: F811
    steps = dict(max_steps=2, save_every=2, eval_fraction=0.0)
    proc = launch(tiny_model, elyza_rows, tmp_path / "fsdp", batch_size=1, **steps)
    one = train_run.run(load_recipe(None, overrides(tiny_model, batch_size=2, **steps)), [elyza_rows],
                        tmp_path / "one")  # the same global batch in one process, while the launch runs
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    two = json.loads((tmp_path / "fsdp" / "stats.json").read_text())
    assert two["distributed"]["world_size"] == 2 and two["distributed"]["fsdp"] is True
    assert two["distributed"]["params_share"] == pytest.approx(0.5, abs=0.05)  # each rank holds about half
    assert one["distributed"] == {"world_size": 1, "fsdp": False, "params_this_rank": one["distributed"][
        "params_this_rank"], "params_share": 1.0}
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), abs=LOSS_TOLERANCE)
    merge.run(tmp_path / "fsdp", tmp_path / "merged", "float32")  # the gathered adapter merges like any other
    assert_merge_equals_peft(tiny_model, tmp_path / "fsdp", tmp_path / "merged", torch.float32)


@pytest.mark.slow  # three 2-process runs (~45 s); `make test-all`
def test_fsdp_killed_after_a_checkpoint_resumes_to_the_same_losses(tiny_model, elyza_rows, tmp_path):  # noqa: F811
    steps = dict(batch_size=1, max_steps=4, save_every=2, eval_fraction=0.0)
    whole = launch(tiny_model, elyza_rows, tmp_path / "whole", **steps)
    assert whole.wait(timeout=300) == 0
    killed = launch(tiny_model, elyza_rows, tmp_path / "killed", **steps)
    marker = tmp_path / "killed" / "checkpoints" / "step-000002" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    ranks = psutil.Process(killed.pid).children(recursive=True)  # torchrun starts them in sessions of their own
    for process in [psutil.Process(killed.pid), *ranks]:
        process.kill()
    psutil.wait_procs(ranks, timeout=30)
    killed.wait()
    assert marker.exists() and not (tmp_path / "killed" / "DONE").exists()
    resumed = launch(tiny_model, elyza_rows, tmp_path / "killed", **steps)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    stats = json.loads((tmp_path / "killed" / "stats.json").read_text())
    assert stats["resumed_from_step"] == 2 and stats["distributed"]["fsdp"] is True, err[-3000:]
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")
