import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BUNDLED = "bundled:smollm2-135m-instruct"


def ezo_in_process(*args) -> subprocess.CompletedProcess:
    """`ezo ARGS` run in this process (typer's CliRunner), ended as cli.main ends it: an EzoError gives its exit code
    and `error: MESSAGE` on stderr; any other exception is a bug and is raised here with its traceback. Saves the
    seconds a new process spends importing torch; a few tests still run the real `ezo` process."""
    from typer.testing import CliRunner

    from ezoforge.cli import _force_takes_optional_stage, app
    from ezoforge.errors import EzoError

    class Stderr(logging.Handler):  # main logs INFO to stderr; here stderr is the runner's while it runs
        def emit(self, record):
            sys.stderr.write(self.format(record) + "\n")

    argv = _force_takes_optional_stage([str(a) for a in args])
    root, handler = logging.getLogger(), Stderr(logging.INFO)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        result = CliRunner().invoke(app, argv)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    error = result.exception
    if error is not None and not isinstance(error, (EzoError, SystemExit)):
        raise error
    if isinstance(error, EzoError):
        return subprocess.CompletedProcess(argv, error.exit_code, result.stdout, f"{result.stderr}error: {error}\n")
    return subprocess.CompletedProcess(argv, result.exit_code, result.stdout, result.stderr)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    # `make test` runs two xdist workers (--dist loadgroup). A module's tests stay on one worker, so its module
    # fixtures (a trained adapter, a loaded server) are built once; the tests that read the session's demo run, from
    # several modules, form one group, so the run is built once.
    for item in items:
        group = "demo" if "demo_run" in item.fixturenames else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


def _gguf_cache() -> Path:
    from ezoforge.models import cache_root

    return cache_root() / "gguf-export"


def _gguf_files() -> set[Path]:
    return set(_gguf_cache().glob("*.gguf")) if _gguf_cache().is_dir() else set()


def pytest_sessionstart(session):
    # Started in the background by a script (`make test &`), pytest inherits an ignored SIGINT, and so would every
    # `ezo` process a test starts: Python then installs no Ctrl-C handler and the Ctrl-C test waits in vain. A handler
    # here is reset to the default in each started process, as a terminal gives it.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    session.config.gguf_before = _gguf_files()


def pytest_sessionfinish(session):
    # llama.cpp runs each merged model through an f16 GGUF written into the user's cache (a new one for every demo
    # run the suite makes, 270 MB each): the run (xdist's controller, or the one process) removes those it added.
    if not hasattr(session.config, "workerinput"):
        for path in _gguf_files() - session.config.gguf_before:
            path.unlink(missing_ok=True)


@pytest.fixture(autouse=True, scope="session")
def _hf_home(tmp_path_factory):
    # `datasets` and the hub cache write under HF_HOME; keep tests from touching the user's cache.
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))


@pytest.fixture(scope="session")
def bundled():
    """The bundled SmolLM2-135M-Instruct, loaded once per session (converted from GGUF once per machine)."""
    from ezoforge.models import load

    return load(BUNDLED)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """External benchmark files that ezoforge does not ship; everything else runs on the package's own data."""
    if not SHARED_DATA.is_dir():
        pytest.skip("needs ../shared/data beside the checkout (external benchmark files: ELYZA-tasks-100, JGLUE, "
                    "ja-mt-bench, a FineWeb-2 sample)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def live_server(bundled):
    """`ezo serve`'s app with the bundled model on a loopback port; yields the base URL (…/v1 for clients)."""
    from ezoforge.infer.generate import Generator
    from ezoforge.infer.serve import BackgroundServer, create_app

    with BackgroundServer(create_app(Generator(bundled), BUNDLED)) as url:
        yield url


@pytest.fixture
def scripted_judge():
    """An OpenAI-compatible judge on loopback with known verdicts (tests/scripted_judge.py); `.url`, `.requests`."""
    from scripted_judge import ScriptedJudge

    with ScriptedJudge() as judge:
        yield judge


# ---------------------------------------------------------------- one judged demo run per session

DEMO = REPO / "recipes" / "demo.yaml"
# The demo recipe cut to seconds: two documents, two training steps, three tasks answered briefly.
DEMO_SMALL = ["synth.limit=2", "synth.pairs_per_doc=1", "synth.max_passage_tokens=400",
              "synth.generation.max_new_tokens=64", "train.max_steps=2", "train.save_every=2", "train.max_length=128",
              "eval.limit=3", "eval.generation.max_new_tokens=24"]


@dataclass(frozen=True)
class DemoRun:
    workdir: Path
    overrides: list[str]  # load_recipe(DEMO, [f"workdir=...", *overrides]) gives the recipe it ran
    report: dict
    judge: object  # the ScriptedJudge that graded it (still serving for the whole session)

    def recipe(self, workdir: Path | None = None, *more: str):
        from ezoforge.stages import load_recipe

        return load_recipe(DEMO, [f"workdir={workdir or self.workdir}", *self.overrides, *more])


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """`ezo run` of the demo recipe cut to seconds, judged by the scripted judge: built once per session and shared
    by the tests that read it. Never change it: copy it with `demo_copy`."""
    from scripted_judge import ScriptedJudge, judge_and_synthesizer

    from ezoforge.pipeline import run_recipe

    root = tmp_path_factory.mktemp("demo")
    with ScriptedJudge(judge_and_synthesizer) as judge:
        # Pairs come from the scripted server (synth's own path is tested in test_synth_run); answers are generated
        # for real, into their own cache.
        overrides = [*DEMO_SMALL, "synth.backend=openai", f"synth.base_url={judge.url}", f"synth.model={BUNDLED}",
                     f"eval.judge_url={judge.url}", "eval.judge_model=scripted",
                     f"eval.cache={root / 'eval-requests.sqlite'}"]
        run = DemoRun(root / "run", overrides, {}, judge)
        report = run_recipe(run.recipe(), DEMO)
        yield DemoRun(run.workdir, overrides, report, judge)


@pytest.fixture
def demo_copy(demo_run, tmp_path) -> DemoRun:
    """A private copy of the session's demo run, for a test that changes it."""
    workdir = tmp_path / "run"
    shutil.copytree(demo_run.workdir, workdir)
    return DemoRun(workdir, demo_run.overrides, demo_run.report, demo_run.judge)


def stand_in_slurm(tmp_path: Path, monkeypatch) -> Path:
    """sbatch and scontrol stand-ins on PATH: each submission is logged (its arguments in the returned file, its job
    script in FILE.scripts) and gets the next job id."""
    log = tmp_path / "sbatch.log"
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.parent.mkdir()
    sbatch.write_text(f'#!/bin/sh\necho "$@" >> {log}\nfor script; do :; done\ncat "$script" >> {log}.scripts\n'
                      f'echo "Submitted batch job $(wc -l < {log})"\n')
    scontrol = sbatch.with_name("scontrol")  # `scontrol show hostnames NODELIST`
    scontrol.write_text('#!/bin/sh\necho "$3"\n')
    for tool in (sbatch, scontrol):
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{sbatch.parent}:{os.environ['PATH']}")
    return log


def run_slurm_array(logs: Path, monkeypatch) -> None:
    """Run each task of the array datatrove submitted from `logs` here, as Slurm would on a node."""
    import json

    import dill

    handler = signal.getsignal(signal.SIGUSR1)  # datatrove's task runner installs a requeue handler
    try:
        for i in range(len(json.loads((logs / "ranks_to_run.json").read_text()))):
            monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(i))
            monkeypatch.setenv("SLURM_NODELIST", "node1")
            with open(logs / "executor.pik", "rb") as f:
                dill.load(f).run()
    finally:
        signal.signal(signal.SIGUSR1, handler)
        monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
        monkeypatch.delenv("SLURM_NODELIST", raising=False)
