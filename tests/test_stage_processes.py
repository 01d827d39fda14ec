"""`ezo run` runs each stage in a process of its own: the parent never holds a stage's model, a stage's error
reaches the parent as the same error, and no stage outlives a parent that was stopped or killed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BUNDLED, REPO
from ezoforge.pipeline import ChildTraceback, run_step, run_step_in_child
from ezoforge.stages import load_recipe

HELDOUT = "bundled:heldout/heldout-ja.jsonl"


def write_recipe(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text("\n".join([f"workdir: {tmp_path / 'run'}", f"model: {{name: '{BUNDLED}'}}", *lines]) + "\n",
                    encoding="utf-8")
    return path


# Two stages, the second loading the bundled model (float32, ~0.5 GB): curate two held-out paragraphs, then
# their perplexity. The script measures its own RSS around `run_recipe` (stages in child processes), then
# around the same eval stage run in this process, as `ezo run` did before.
RSS_SCRIPT = """
import json, sys
from pathlib import Path
from ezoforge.pipeline import run_recipe, run_step
from ezoforge.stages import load_recipe

def kib(field):
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))

recipe = load_recipe(Path(sys.argv[1]))
before = kib("VmRSS")
run_recipe(recipe)
children = {"before": before, "after": kib("VmRSS"), "peak": kib("VmHWM")}
recipe.eval.cache = Path(sys.argv[2])  # an empty request cache: the stage computes, loading the model
run_step("eval-base", recipe, Path(recipe.workdir), force=True)
print(json.dumps({"children": children, "in_process_peak": kib("VmHWM")}))
"""


@pytest.mark.slow  # curate, then eval loading the model twice: about a minute on 2 busy cores
def test_parent_rss_does_not_grow_across_stages(tmp_path):
    from ezoforge.models import bundled_gguf, convert_gguf

    model_bytes = sum(f.stat().st_size for f in convert_gguf(bundled_gguf(BUNDLED.removeprefix("bundled:"))).glob("*.safetensors"))
    recipe = write_recipe(tmp_path, "stages: [curate, eval]", "curate: {inputs: ['bundled:web/fineweb-demo.parquet']}",
                          f"eval: {{tasks: ['ppl:{HELDOUT}'], limit: 2, cache: '{tmp_path / 'cache.sqlite'}'}}")
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(recipe), str(tmp_path / "other.sqlite")],
                         capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    children = rss["children"]
    assert json.loads((tmp_path / "run" / "eval-base" / "report.json").read_text())["perplexity"] > 1
    # Both stages ran and the model was loaded, yet the parent's peak stayed within a fifth of the model's size
    # of where it began; the same stage run in-process raises the peak by more than the whole model.
    assert (children["peak"] - children["before"]) * 1024 < model_bytes / 5, rss
    assert (children["after"] - children["before"]) * 1024 < model_bytes / 5, rss
    assert (rss["in_process_peak"] - children["peak"]) * 1024 > model_bytes, rss


def test_a_stage_error_reaches_the_parent_as_the_same_error(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, "stages: [eval]", "eval: {tasks: ['ppl:/no/such/file.jsonl']}"))
    workdir = Path(recipe.workdir)
    with pytest.raises(Exception) as here:
        run_step("eval-base", recipe, workdir)
    with pytest.raises(type(here.value)) as there:
        run_step_in_child("eval-base", recipe, workdir)
    assert type(there.value) is type(here.value) and str(there.value) == str(here.value)
    assert "/no/such/file.jsonl" in str(there.value) and there.value.exit_code == here.value.exit_code


def test_a_stage_crash_carries_the_stage_traceback(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, "stages: [eval]"))
    with pytest.raises(KeyError) as info:
        run_step_in_child("no-such-step", recipe, Path(recipe.workdir))  # a bug, not a user's mistake
    assert isinstance(info.value.__cause__, ChildTraceback)
    assert "in run_step" in str(info.value.__cause__)


def test_the_cli_prints_a_stage_error_without_a_traceback(tmp_path):
    recipe = write_recipe(tmp_path, "stages: [eval]", "eval: {tasks: ['ppl:/no/such/file.jsonl']}")
    out = subprocess.run([sys.executable, "-m", "ezoforge", "run", str(recipe)], capture_output=True, text=True,
                         cwd=REPO, timeout=600)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "error:" in out.stderr and "/no/such/file.jsonl" in out.stderr and "Traceback" not in out.stderr


def children_of(pid: int) -> set[int]:
    kids = set()
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.add(int(entry.name))
    return kids


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, what: str, limit_s: float = 600):
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_a_stopped_run_leaves_no_stage_running(tmp_path, how):
    # Long answers one at a time: the stage is surely still working when the run is stopped.
    recipe = write_recipe(tmp_path, "stages: [eval]", "eval:", "  tasks: ['elyza100:bundled:tasks/demo-tasks.jsonl']",
                          f"  cache: '{tmp_path / 'cache.sqlite'}'", "  generation: {max_new_tokens: 512, batch_size: 1}")
    log = tmp_path / "stderr.txt"
    with open(log, "w") as sink:  # a file, not a pipe: a full pipe would block the writers
        parent = subprocess.Popen([sys.executable, "-m", "ezoforge", "run", str(recipe)], cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=sink)
    try:
        # The stage process (the spawn machinery starts a resource tracker too: the stage is the one that
        # claims the eval folder).
        wait_for(lambda: (tmp_path / "run" / "eval-base").is_dir(), "the eval stage to start")
        stages = {pid for pid in children_of(parent.pid)
                  if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")}
        assert len(stages) == 1, stages
        os.kill(parent.pid, how)
        parent.wait(timeout=120)
        (stage,) = stages
        wait_for(lambda: not running(stage), "the stage process to end", limit_s=120)  # its grace is 30 s
    finally:
        if parent.poll() is None:
            parent.kill()
    if how == signal.SIGINT:
        assert parent.returncode == 130, log.read_text()[-2000:]
    assert not (tmp_path / "run" / "eval-base" / "DONE").exists()
