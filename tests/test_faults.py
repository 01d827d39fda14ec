"""Faults of the machine and of other processes, not of the input: one writer per folder, a full disk, a server open
to the network, a folder that only looks like a model, caches written by several processes at once. Each is named
in one line with its own exit code (75), and nothing finished is lost."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BUNDLED, DEMO, REPO, ezo_in_process
from ezoforge.errors import MachineFault
from ezoforge.stage import FolderLock

FAULT = MachineFault.exit_code

# A real process holding a folder as a stage (or `ezo run`) does, until it is killed.
HOLD = """
import sys, time
from ezoforge.stage import FolderLock, Stage
if sys.argv[2] == "stage":
    held = Stage("train", sys.argv[1], {"train": {}})
    held.start()
else:
    held = FolderLock(sys.argv[1])
    held.acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("holder", ["stage", "run"])
def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path, holder):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"instruction": "東京は？", "response": "日本の首都です。"}, ensure_ascii=False) + "\n")
    folder = tmp_path / ("train" if holder == "stage" else "run")
    command = (["train", pairs, "--out", folder, "--model", BUNDLED] if holder == "stage"
               else ["run", DEMO, "--set", f"workdir={folder}", "--ignore-disk-plan"])
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), holder], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "held"
        before = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        result = ezo_in_process(*command)
        assert result.returncode == FAULT, result.stderr
        assert str(folder.absolute()) in result.stderr and f"pid {proc.pid}@{socket.gethostname()}" in result.stderr
        assert (sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []) == before  # nothing touched
    finally:
        proc.kill()
        proc.wait()
    # The kernel let go of the killed holder's lock: the next writer takes the folder at once.
    lock = FolderLock(folder)
    lock.acquire()
    lock.release()


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (mounting needs root: skipped where the machine does not allow it); `.grow()` enlarges it."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()}): the full-disk case needs root")

    class Disk:
        path = mount

        @staticmethod
        def grow() -> None:
            subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)

    yield Disk
    subprocess.run(["umount", "-l", str(mount)], check=False)


def curated(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    files = sorted((folder / "data").rglob("*.parquet")) or sorted((folder / "data").rglob("*.jsonl*"))
    assert files, folder
    if files[0].suffix == ".parquet":
        return [row for f in files for row in pq.read_table(f).to_pylist()]
    import gzip
    return [json.loads(line) for f in files for line in gzip.open(f, "rt", encoding="utf-8")]


def test_a_full_disk_is_named_and_the_rerun_resumes_to_the_same_result(small_disk, tmp_path):
    out = small_disk.path / "curate"
    full = ezo_in_process("curate", "-c", DEMO, "--out", out)
    assert full.returncode == FAULT, full.stderr
    assert f"the disk is full (No space left on device) writing {out}" in full.stderr and "KiB free there" in full.stderr
    assert "internal error" not in full.stderr and not (out / "DONE").exists()
    small_disk.grow()
    assert ezo_in_process("curate", "-c", DEMO, "--out", out).returncode == 0
    assert ezo_in_process("curate", "-c", DEMO, "--out", tmp_path / "whole").returncode == 0
    assert curated(out) == curated(tmp_path / "whole")


def test_ezo_run_refuses_a_disk_the_plan_says_is_too_small(small_disk):
    workdir = small_disk.path / "run"
    refused = ezo_in_process("run", DEMO, "--set", f"workdir={workdir}")
    assert refused.returncode == FAULT, refused.stderr
    assert "the disk cannot hold this run: ezo plan puts what the stages still to run write at " in refused.stderr
    assert "KiB is free at" in refused.stderr and "--ignore-disk-plan" in refused.stderr
    assert not (workdir / "curate").exists()  # refused before any stage started


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_serve_beyond_loopback_needs_a_key_or_its_own_flag(host):
    refused = ezo_in_process("serve", "--model", "/no/such/model", "--host", host)
    assert refused.returncode == 2 and f"--host {host}: listens beyond this machine without an API key" in refused.stderr
    assert "--open-without-key" in refused.stderr
    # Said open: it goes on to the next check (here, the model), and the log says the server is open.
    opened = ezo_in_process("serve", "--model", "/no/such/model", "--host", host, "--open-without-key")
    assert "takes requests from anyone who can reach it" in opened.stderr and "/no/such/model" in opened.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_needs_no_key(host):
    from ezoforge.infer.serve import check_exposure, loopback_only

    assert loopback_only(host)
    check_exposure(host, None, False)


NOT_A_CONFIG = "not a model's config (no `model_type`)"


@pytest.mark.parametrize("config, complaint", [
    ({}, "not a model's config (no `model_type`)"),
    ([1, 2], "not a model's config (no `model_type`)"),
    ({"model_type": "llama"}, "no weights"),
])
def test_a_folder_that_only_looks_like_a_model_is_a_clear_error(tmp_path, config, complaint):
    """The config is checked with every other setting, the weights before a load (after the settings)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    for command in (["export", folder, "--out", tmp_path / "export"], ["generate", "--model", folder, "--prompt", "hi"]):
        result = ezo_in_process(*command)
        assert result.returncode == 1 and complaint in result.stderr and str(folder) in result.stderr, result.stderr
    assert not (tmp_path / "export").exists()
    (folder / "config.json").write_text("{not json")
    result = ezo_in_process("generate", "--model", folder, "--prompt", "hi")
    assert result.returncode == 1 and "config.json: not readable as JSON" in result.stderr


WRITE_CACHE = """
import sys
from ezoforge.cache import RequestCache
cache = RequestCache(sys.argv[1])
for i in range(200):
    cache.put(f"{sys.argv[2]}-{i}", {"text": f"answer {sys.argv[2]} {i}"})
"""


def test_the_request_cache_takes_writers_from_several_processes_at_once(tmp_path):
    from ezoforge.cache import RequestCache

    path = tmp_path / "requests.sqlite"
    writers = [subprocess.Popen([sys.executable, "-c", WRITE_CACHE, str(path), str(w)], cwd=REPO,
                                stderr=subprocess.PIPE, text=True) for w in range(4)]
    for w in writers:
        assert w.wait(timeout=120) == 0, w.stderr.read()
    cache = RequestCache(path)
    assert len(cache) == 800
    assert all(cache.get(f"{w}-{i}") == {"text": f"answer {w} {i}"} for w in range(4) for i in range(200))


def test_a_stage_killed_outright_is_named_as_the_machines_fault(tmp_path):
    """A stage process the kernel killed (as the out-of-memory killer does) ends `ezo run` with exit 75, naming the
    stage and the signal; the pipeline's own stage process is killed here from outside, mid-work."""
    import threading
    import time

    from ezoforge.pipeline import run_recipe
    from ezoforge.stages import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text("\n".join([
        f"workdir: {tmp_path / 'run'}", f"model: {{name: '{BUNDLED}'}}", "stages: [eval]", "eval:",
        "  tasks: ['elyza100:bundled:tasks/demo-tasks.jsonl']", f"  cache: '{tmp_path / 'cache.sqlite'}'",
        "  generation: {max_new_tokens: 512, batch_size: 1}"]) + "\n", encoding="utf-8")
    recipe = load_recipe(path)

    def kill_the_stage() -> None:
        folder = tmp_path / "run" / "eval-base"
        while not folder.is_dir():
            time.sleep(0.1)
        holder = (folder.parent / ".eval-base.lock").read_text()
        os.kill(int(holder.split()[1].split("@")[0]), signal.SIGKILL)

    threading.Thread(target=kill_the_stage, daemon=True).start()
    with pytest.raises(MachineFault) as info:
        run_recipe(recipe)
    assert "eval-base: the stage's process ended without a result (killed by SIGKILL" in str(info.value)
    assert info.value.resource == "ram" and info.value.stage == "eval-base"
    assert not (tmp_path / "run" / "eval-base" / "DONE").exists()


@pytest.mark.parametrize("error, resource, words", [
    ("cuda", "gpu", "out of GPU memory: CUDA out of memory. Tried to allocate 2.00 GiB"),
    ("cpu", "ram", "out of host memory ("),
    ("python", "ram", "out of host memory ("),
])
def test_memory_that_ran_out_is_named_with_the_plans_figure(error, resource, words):
    """torch's own exceptions (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError) and Python's MemoryError,
    raised in a stage's work, end the command with exit 75 and the plan's figure for that stage beside them."""
    import torch

    from ezoforge.cli import plan_figure_beside_faults
    from ezoforge.errors import faults_named
    from ezoforge.stages import load_recipe

    raised = {"cuda": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail"),
              "cpu": RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"),
              "python": MemoryError()}[error]
    recipe = load_recipe(REPO / "recipes" / "llama31-70b-ezo.yaml")
    with pytest.raises(MachineFault) as info:
        with plan_figure_beside_faults(recipe), faults_named("/tmp/run/train", "train"):
            raise raised
    assert info.value.exit_code == FAULT and info.value.resource == resource
    what = "GPU memory" if resource == "gpu" else "host memory"
    assert str(info.value).startswith(words) and f"; ezo plan puts train's {what} at " in str(info.value)
    assert "more detail" not in str(info.value)  # one line
