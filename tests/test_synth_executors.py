"""`ezo synth` on curate's engines: a slice of the requests per datatrove task (local processes, Slurm job arrays, a
Ray cluster), each with its own request cache, joined into the stage's folder. The bundled model answers on
llama.cpp one sequence at a time (batch-independent numerics), so a sharded run must equal the one-process run:
the same pairs, ids, rejects and stats."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, run_slurm_array, stand_in_slurm
from ezoforge.config import bundled_data
from ezoforge.errors import ConfigError, EzoError, MachineFault
from ezoforge.records import read_rows
from ezoforge.stages import load_recipe
from ezoforge.synth.run import run

# A document in 2 passages and short answers: the answers, parsed or rejected, are what the runs compare.
SETTINGS = ["synth.backend=llamacpp", "synth.generation.max_new_tokens=16", "synth.pairs_per_doc=1",
            "synth.max_passage_tokens=192", "synth.generation.batch_size=1"]


def rows(folder: Path) -> list[dict]:
    return [row for f in sorted(folder.glob("*.parquet")) for _, row in read_rows(f)]


def outcome(out: Path) -> tuple[list, list, dict]:
    """What a synth folder holds, less its timing."""
    stats = json.loads((out / "stats.json").read_text())
    stats.pop("tokens_per_s")
    return rows(out / "data"), rows(out / "rejected"), stats


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    lines = Path(bundled_data("bundled:heldout/heldout-ja.jsonl")).read_text(encoding="utf-8").splitlines()[:1]
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_process(docs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "synth"
    run(load_recipe(None, SETTINGS), docs, out, allow_empty=True)
    return out


def test_local_tasks_equal_one_process(docs, one_process, tmp_path):
    out = tmp_path / "synth"
    stats = run(load_recipe(None, SETTINGS + ["synth.workers=2"]), docs, out, allow_empty=True)
    assert outcome(out) == outcome(one_process) and stats["requests_sent"] == stats["requests"] == 2
    assert sorted(p.name for p in (out / "tasks").glob("answers-*.json")) == ["answers-00000.json", "answers-00001.json"]
    # The executor and the worker count are operational: the folder is the same stage's.
    assert json.loads((out / "DONE").read_text())["fingerprint"] == \
        json.loads((one_process / "DONE").read_text())["fingerprint"]


def test_slurm_submits_an_array_and_the_rerun_collects(docs, one_process, tmp_path, monkeypatch):
    """Stand-in sbatch/scontrol as curate's Slurm test: the array is submitted with the GPUs each task asks for, the
    folder is held (no --force), and once its tasks have run as Slurm would run them, the same command collects."""
    log = stand_in_slurm(tmp_path, monkeypatch)
    out = tmp_path / "synth"
    slurm = load_recipe(None, SETTINGS + ["synth.workers=2", "synth.executor.kind=slurm",
                                          "synth.executor.partition=gpu", "synth.executor.gpus_per_task=1"])
    with pytest.raises(EzoError, match="submitted the synth tasks to Slurm as jobs 1 "):
        run(slurm, docs, out, allow_empty=True)
    script = Path(f"{log}.scripts").read_text()
    assert "#SBATCH --array=0-1" in script and "#SBATCH --gres=gpu:1" in script and "#SBATCH --partition=gpu" in script
    if Path("/dev/shm").is_dir():  # a node's own memory: tasks on other nodes could not write there
        with pytest.raises(ConfigError, match="tmpfs, this node's memory"):
            run(slurm, docs, Path(tempfile.mkdtemp(dir="/dev/shm")) / "synth", allow_empty=True)
    with pytest.raises(MachineFault, match="Slurm jobs 1 still write into it"):
        run(slurm, docs, out, force=True, allow_empty=True)
    run_slurm_array(out / "tasks" / "logs", monkeypatch)
    collected = run(slurm, docs, out, allow_empty=True)
    assert outcome(out) == outcome(one_process) and collected["requests_sent"] == 2
    assert sum("RUN_OFFSET" in line for line in log.read_text().splitlines()) == 1  # collected: nothing resubmitted

    # Task 2 killed after answering (no answers file, no completion marker), and the stage with it (no DONE): the
    # rerun resubmits that task alone, which finds every answer in its own cache and sends nothing.
    tasks = out / "tasks"
    for lost in (tasks / "answers-00001.json", tasks / "logs" / "completions" / "00001", out / "DONE",
                 out / "requests.sqlite"):
        lost.unlink()
    with pytest.raises(EzoError, match="submitted the synth tasks to Slurm as jobs 3 "):  # 2: the first array's stats job
        run(slurm, docs, out, allow_empty=True)
    assert json.loads((tasks / "logs" / "ranks_to_run.json").read_text()) == [1]
    run_slurm_array(tasks / "logs", monkeypatch)
    again = run(slurm, docs, out, allow_empty=True)
    resumed, whole = outcome(out), outcome(one_process)
    assert again["requests_sent"] == 0 and resumed[:2] == whole[:2]
    assert {**resumed[2], "requests_sent": whole[2]["requests_sent"]} == whole[2]


def test_a_local_ray_cluster_runs_the_tasks(docs, one_process, tmp_path):
    """`ray start --head` here, two tasks on it, `ezo synth` as a user runs it."""
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    ray = Path(sys.executable).with_name("ray")
    short = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # its socket paths must fit in 107 characters
    start = subprocess.run([ray, "start", "--head", "--num-cpus=2", "--include-dashboard=false",
                            f"--temp-dir={short}", "--object-store-memory=100000000", "--port=0"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        out = tmp_path / "synth"
        sets = [arg for s in SETTINGS + ["synth.workers=2", "synth.executor.kind=ray"] for arg in ("--set", s)]
        result = subprocess.run([sys.executable, "-m", "ezoforge", "synth", docs, "--out", out, "--allow-empty", *sets], cwd=REPO,
                                env={**env, "RAY_ADDRESS": "auto", "OMP_NUM_THREADS": "1"}, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert outcome(out) == outcome(one_process)
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(short, ignore_errors=True)
