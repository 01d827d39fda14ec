"""`ezo run`: the recipe's stages in order, each in its own folder under the workdir (stages.STEPS).

A stage whose DONE marker matches its settings is skipped (each stage checks that itself), so a killed
run continues where it stopped. A stage whose output-shaping settings were edited is refused, naming the keys,
and nothing is deleted: `--force STAGE` redoes that stage and every stage after it, `--force` the whole recipe.

Each stage runs in a process of its own: whatever it loaded (a model, a vLLM engine, CUDA memory, allocator
caches) is given back to the system before the next stage starts, so a synthesis engine never shares the card
with training. The child starts its own process group: an interrupted run stops the stage and anything it started,
and a child whose parent died (killed outright) stops itself.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection, wait
from pathlib import Path

from rich.table import Table

from ezoforge.config import Recipe
from ezoforge.errors import ConfigError, EzoError, MachineFault, machine_fault
from ezoforge.logs import console, setup_logging
from ezoforge.records import write_json
from ezoforge.stage import FolderLock, done_info
from ezoforge.stages import STEPS, readers, steps

log = logging.getLogger(__name__)


def run_step(step: str, recipe: Recipe, workdir: Path, force: bool = False) -> dict:
    """One step, handed its own folder and those of the steps it reads."""
    s = STEPS[step]
    return s.run(recipe, workdir / s.folder, {r: workdir / STEPS[r].folder for r in s.reads}, force)


class ChildTraceback(Exception):
    """The traceback of a stage's process, shown as the cause of the exception re-raised here."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


# Seconds a stopped stage gets to clean up (locks, partial files) before it is terminated, then killed.
STOP_GRACE_S = 30


class StageProcess:
    """A fresh process (nothing of this one is inherited but its environment: no model, no CUDA state) that runs
    steps one at a time when told. It ends after a step that did work, so that step's memory is given back; steps
    found already done share one process, so a resumed run does not pay a process start per finished stage."""

    def __init__(self, recipe: Recipe, workdir: Path):
        ctx = _context()
        self.conn, theirs = ctx.Pipe()
        alive_in, self.alive = ctx.Pipe(duplex=False)  # held open here: the child sees EOF once we are gone
        self.proc = ctx.Process(target=_child, name="ezo-stage", daemon=False,
                                args=(recipe, workdir, theirs, alive_in, logging.getLogger().level,
                                      dict(os.environ)))
        self.proc.start()
        theirs.close()
        alive_in.close()

    def run(self, step: str, force: bool) -> tuple[dict, bool]:
        """The step's result and whether it did work (after which this process has ended); raises what the
        step raised: an EzoError as the same class and message, anything else with the child's traceback."""
        try:
            self.conn.send((step, force))
            wait([self.conn, self.proc.sentinel])
            try:
                kind, payload, worked = self.conn.recv()
            except (EOFError, OSError):  # ended without a word: killed (as the out-of-memory killer does), or crashed
                self.proc.join()
                message = (f"{step}: the stage's process ended without a result "
                           f"({_exit_reason(self.proc.exitcode)}); rerun to resume it")
                if self.proc.exitcode == -signal.SIGKILL:
                    raise MachineFault(message, "ram", step) from None
                raise EzoError(message) from None
        except BaseException:  # Ctrl-C here, or an error while waiting: the stage stops too
            _stop(self.proc, signal.SIGINT)
            self.close()
            raise
        if kind == "ok":
            if worked:
                self.close()
            return payload, worked
        self.close()
        if kind == "error":
            raise payload from None
        error, child_traceback = payload
        raise error from ChildTraceback(child_traceback)

    def close(self) -> None:
        """Let the process end (it does once its pipe closes) and wait until it has."""
        self.conn.close()
        self.proc.join(STOP_GRACE_S)
        if self.proc.is_alive():  # something it started does not end
            log.warning("the stage's process did not exit after its last step; terminating it")
            _stop(self.proc, signal.SIGTERM)
        self.alive.close()


def run_step_in_child(step: str, recipe: Recipe, workdir: Path, force: bool = False) -> dict:
    """`run_step` in a process of its own, which has ended when this returns."""
    child = StageProcess(recipe, workdir)
    try:
        return child.run(step, force)[0]
    finally:
        child.close()


def _stop(proc, first: int) -> None:
    """Signal the child's process group (the stage and any workers it started), then escalate."""
    for sig in (first, signal.SIGTERM, signal.SIGKILL):
        if not proc.is_alive():
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        proc.join(STOP_GRACE_S if sig == signal.SIGINT else 5)


class PeakMemory:
    """The peak host memory (RSS of the stage's process and everything it started) and GPU memory (used on any card,
    beyond what was in use when it started) while a stage runs, sampled from outside it: nothing here touches CUDA,
    so a stage's engine still gets the whole card. GPU figures come from NVML (nvidia-ml-py) or nvidia-smi; None
    where there is neither."""

    INTERVAL_S = 0.25

    def __init__(self, pid: int):
        import psutil  # an accelerate dependency

        self.proc, self.ram, self.gpu = psutil.Process(pid), 0, None
        self._gpu_used = _gpu_reader()
        self._gpu_base = self._gpu_used() if self._gpu_used else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while True:
            try:
                tree = [self.proc, *self.proc.children(recursive=True)]
                self.ram = max(self.ram, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:  # a process ended between the listing and the reading
                pass
            if self._gpu_used:
                used = self._gpu_used()
                beyond = max(u - b for u, b in zip(used, self._gpu_base)) if used else 0
                self.gpu = max(self.gpu or 0, beyond)
            if self._stop.wait(self.INTERVAL_S):
                return

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        gib = 2**30
        return {"peak_ram_gib": round(self.ram / gib, 2),
                "peak_gpu_gib": None if self.gpu is None else round(self.gpu / gib, 2)}


def _gpu_reader():
    """A function giving each card's used memory in bytes (NVML, else nvidia-smi), or None without either."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        return lambda: [pynvml.nvmlDeviceGetMemoryInfo(h).used for h in handles]
    except Exception:  # not installed, or no driver
        pass
    if not nvidia_smi("memory.used"):
        return None
    return lambda: [int(mib) * 2**20 for mib in nvidia_smi("memory.used")]


def nvidia_smi(field: str) -> list[str]:
    """One `--query-gpu` field of every card, as nvidia-smi prints it (no unit); [] without nvidia-smi."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        return f"killed by {name}" + (", as the out-of-memory killer does" if name == "SIGKILL" else "")
    return f"exit code {code}"


def _context():
    """Stage processes fork from a fresh server process that has imported torch and transformers once (seconds a
    stage need not spend again); it has touched no GPU, so no CUDA state reaches a stage. Where there is no fork
    server (Windows), each stage is spawned."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers.modeling_utils"])
    return ctx


def _child(recipe: Recipe, workdir: Path, conn: Connection, alive: Connection, log_level: int,
           env: dict[str, str]) -> None:
    # The fork server's environment is the one it started with: take the parent's as it is now.
    os.environ.clear()
    os.environ.update(env)
    os.setpgrp()  # its own group: stopping the stage stops its workers too
    signal.signal(signal.SIGINT, _interrupted)
    setup_logging(log_level)
    threading.Thread(target=_stop_when_orphaned, args=(alive,), daemon=True).start()
    try:
        while _next_step(recipe, workdir, conn):
            pass
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # stopped by the parent, which already knows, or the parent is gone


# Seconds between the repeats of a stop request that the stage has not acted on yet.
INTERRUPT_AGAIN_S = 2


def _interrupted(signum, frame) -> None:
    """Stop the stage. Python drops an interrupt raised in a finalizer (`__del__`, run wherever the collector
    happens to run) or in a C library's callback, and the stage would work on until terminated: until the process
    ends, the request is repeated, with time between for the cleanup it started."""
    if not getattr(_interrupted, "repeating", False):
        _interrupted.repeating = True
        threading.Thread(target=_interrupt_again, daemon=True).start()
    raise KeyboardInterrupt


def _interrupt_again() -> None:
    while True:
        time.sleep(INTERRUPT_AGAIN_S)
        os.kill(os.getpid(), signal.SIGINT)


def _next_step(recipe: Recipe, workdir: Path, conn: Connection) -> bool:
    """Run the step the parent names and report it; False when this process should end."""
    try:
        step, force = conn.recv()
    except EOFError:
        return False
    marker = workdir / STEPS[step].folder / "DONE" if step in STEPS else None  # an unknown step fails in run_step
    before = marker.stat().st_mtime_ns if marker and marker.exists() else None
    try:
        result = run_step(step, recipe, workdir, force=force)
    except KeyboardInterrupt:
        raise
    except EzoError as e:
        if isinstance(e, MachineFault):
            e.stage = step  # the step, for the plan's figure beside the fault
        conn.send(("error", _portable(e, EzoError(str(e))), True))
        return False
    except BaseException as e:
        if (fault := machine_fault(e, stage=step)) is not None:
            conn.send(("error", fault, True))
            return False
        conn.send(("crash", (_portable(e, RuntimeError(f"{type(e).__name__}: {e}")), traceback.format_exc()), True))
        return False
    worked = force or before is None or not marker.exists() or marker.stat().st_mtime_ns != before
    conn.send(("ok", result, worked))
    return not worked


def _portable(error: BaseException, fallback: BaseException) -> BaseException:
    """The exception itself when it survives pickling unchanged, else `fallback` (keeping its exit code)."""
    try:
        copy = pickle.loads(pickle.dumps(error))
        if type(copy) is type(error) and str(copy) == str(error):
            return copy
    except Exception:
        pass
    fallback.exit_code = getattr(error, "exit_code", 1)
    return fallback


def _stop_when_orphaned(alive: Connection) -> None:
    """Block until the parent is gone (its end of the pipe closes), then stop this stage's whole group."""
    try:
        alive.recv()
    except (EOFError, OSError):
        pass
    os.killpg(os.getpgrp(), signal.SIGINT)
    time.sleep(STOP_GRACE_S)
    os.killpg(os.getpgrp(), signal.SIGKILL)


ALL = "all"


def forced_steps(plan: list[str], force: list[str]) -> set[str]:
    """`--force` (all) or `--force STAGE…`: those steps and every step after them that reads their output
    (stages.STEPS' `reads`; a stage names all its steps: `eval` the evals)."""
    if not force:
        return set()
    if ALL in force:
        return set(plan)
    by_stage: dict[str, list[str]] = {}
    for step in plan:
        by_stage.setdefault(STEPS[step].stage, []).append(step)
    names = by_stage | {step: [step] for step in plan}  # a step by its name, a stage (`eval`) by all its steps
    unknown = [f for f in force if f not in names]
    if unknown:
        raise ConfigError(f"--force {unknown[0]}: not a stage of this recipe (stages: {', '.join(plan)})")
    todo, redo = [s for f in force for s in names[f]], set()
    while todo:
        step = todo.pop()
        if step in plan and step not in redo:
            redo.add(step)
            todo += readers(step)
    return redo


def run_recipe(recipe: Recipe, recipe_path: Path | None = None, force: list[str] = ()) -> dict:
    workdir = Path(recipe.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"{recipe_path or 'recipe'}: workdir {workdir} exists and is not a folder")
    plan = steps(recipe)
    redo = forced_steps(plan, list(force))
    workdir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(workdir)  # one `ezo run` per workdir
    lock.acquire()
    try:
        return _run_steps(recipe, recipe_path, workdir, plan, redo)
    finally:
        lock.release()


def _run_steps(recipe: Recipe, recipe_path: Path | None, workdir: Path, plan: list[str], redo: set[str]) -> dict:
    timings_path = workdir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    console.rule(f"ezo run {recipe_path or ''} → {workdir}")
    results, child = {}, None
    try:
        for i, step in enumerate(plan, 1):
            folder = workdir / STEPS[step].folder
            was_done = step not in redo and done_info(folder) is not None
            console.rule(f"[{i}/{len(plan)}] {step}" + (" (--force: redo)" if step in redo else ""))
            start = time.perf_counter()
            child = child or StageProcess(recipe, workdir)
            peak = PeakMemory(child.proc.pid)
            try:
                results[step], worked = child.run(step, force=step in redo)
            finally:
                peaks = peak.stop()
            if worked:  # that process has ended: the next stage starts with the memory it held
                child = None
            seconds = time.perf_counter() - start
            marker = done_info(folder)
            made = marker and marker.fingerprint
            # A skipped stage keeps the time and memory it took when it really ran.
            if not (was_done and timings.get(step, {}).get("fingerprint") == made):
                timings[step] = {"seconds": round(seconds, 1), "fingerprint": made, **peaks}
                write_json(timings_path, timings)
            else:
                console.print(f"[dim]{step}: already done with these settings, skipped[/dim]")
    finally:
        if child is not None:
            child.close()
    from ezoforge.recipe_report import write_run_report

    report = write_run_report(workdir, plan, timings)
    _print_summary(report)
    return report


def _print_summary(report: dict) -> None:
    table = Table(title="ezo run — summary")
    table.add_column("stage")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    for step, info in report["stages"].items():
        table.add_row(step, info.get("summary", ""), f"{info.get('seconds', 0):.0f}")
    console.print(table)
    console.print(f"report: {report['paths']['html']}")
