"""The life cycle every stage output folder shares, and the one place that reads DONE markers and finds inputs.

A folder is complete (DONE written last, holding the fingerprint of the settings that shaped it) or being
resumed under the same settings. Every stage's settings have one layout (SETTINGS): its output settings, the
model it uses, and its inputs' fingerprints. Output settings are the output-shaping keys only
(config.output_settings): changing an operational key (logging, saving, workers, retries…) never invalidates a
folder. A folder made with other settings is refused, naming each differing key, and left untouched; only
`--force` deletes it to start over. One process writes a folder at a time (FolderLock).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from ezoforge.config import diff_keys, fingerprint, redact
from ezoforge.errors import ConfigError, MachineFault, RecordError, faults_named
from ezoforge.records import (
    DATA_SUFFIXES,
    DONE,
    RECORD_FORMAT,
    Done,
    ezoforge_version,
    files_under,
    replace_folder,
    write_json,
    write_text,
)

CONFIG = "config.yaml"
# The settings a stage folder records (config.yaml, DONE) and is fingerprinted by. `output` holds the recipe
# sections that shape the output under their own names (and any version the stage adds), so `output.train.lr`
# is the recipe's `train.lr`.
SETTINGS = ("output", "model", "inputs")


class FolderLock:
    """One writer per folder: an exclusive lock on a hidden file beside it (`.NAME.lock`), which names its holder.
    The lock is flock's: the kernel drops it when the holder dies, so a killed run never blocks the next, and NFS
    keeps it across nodes. A second process is refused at once, naming the folder and the holder; within one process
    the lock is shared (a stage's steps, in-process runs)."""

    def __init__(self, folder: str | Path):
        from filelock import FileLock  # where a folder is written, not where one is read

        self.folder = Path(folder).absolute()
        self.path = self.folder.parent / f".{self.folder.name}.lock"
        self._lock = FileLock(self.path, is_singleton=True, thread_local=False, on_acquired=_name_holder)
        self._held = False

    def acquire(self) -> None:
        from filelock import Timeout

        if self._held:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            try:
                holder = self.path.read_text(encoding="utf-8").strip()
            except OSError:
                holder = ""
            raise MachineFault(f"{self.folder}: another ezo process is writing it ({holder or 'holder unknown'}); "
                               "wait for it to end, or stop it, then rerun") from None
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()


def _name_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}@{socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)


def done_info(folder: str | Path) -> Done | None:
    """The DONE marker (records.Done), or None when the folder is not finished. A marker another version of
    ezoforge recorded in another layout is refused, naming the folder."""
    marker = Path(folder) / DONE
    try:
        raw = json.loads(marker.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):  # not finished, or a file (a raw input)
        return None
    except (OSError, ValueError) as e:
        raise RecordError(f"{marker}: not a readable DONE marker ({e}); redo that stage (--force)") from None
    if not isinstance(raw, dict) or raw.get("format") != RECORD_FORMAT:
        made = raw.get("ezoforge", "an older version") if isinstance(raw, dict) else "an older version"
        raise RecordError(f"{folder}: made by ezoforge {made}, which records its folders in another layout than "
                          f"this ezoforge {ezoforge_version()}; redo that stage with this one (--force) to use it")
    try:
        return Done.model_validate(raw)
    except ValueError as e:
        raise RecordError(f"{marker}: {e}") from None


def done_fingerprint(folder: str | Path) -> str | None:
    info = done_info(folder)
    return None if info is None else info.fingerprint


def lineage(folder: str | Path) -> list[tuple[Path, Done]]:
    """A finished folder and every finished folder its DONE inputs lead to, each once, nearest first (breadth
    first). It follows what each DONE recorded, whatever the stages are: a stage inserted into the chain is
    passed through like any other. Inputs that are not finished stage folders (raw corpora, a user's files) end
    their branch."""
    found: list[tuple[Path, Done]] = []
    seen: set[Path] = set()
    todo = [Path(folder)]
    while todo:
        here = todo.pop(0)
        key = here.resolve()
        if key in seen or (info := done_info(here)) is None:
            continue
        seen.add(key)
        found.append((here, info))
        todo += map(Path, info.inputs)
    return found


def is_stage_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / CONFIG).is_file() or (folder / DONE).is_file() or (folder / "data").is_dir()


def input_files(paths: list[str | Path]) -> list[Path]:
    """Data files of each input: a stage folder must be finished and is read through its data/ only; a plain
    folder gives its data files at any depth (records.files_under); a file is itself."""
    files: list[Path] = []
    for path in map(Path, paths):
        if is_stage_folder(path):
            if done_info(path) is None:
                raise RecordError(f"{path}: this stage output is not finished (no DONE marker); finish or rerun it first")
            if not (path / "data").is_dir():
                raise RecordError(f"{path}: a finished stage folder without data/ (not a curate or synth output)")
            files += _data_files(path / "data")
        elif path.is_dir():
            files += _data_files(path)
        elif path.is_file():
            files.append(path)
        else:
            raise RecordError(f"{path}: no such file or folder")
    return files


def _data_files(folder: Path) -> list[Path]:
    files = files_under(folder, DATA_SUFFIXES)
    if not files:
        raise RecordError(f"{folder}: no data files ({', '.join('*' + s for s in DATA_SUFFIXES)})")
    return files


def input_fingerprints(paths: list[str | Path]) -> list[str]:
    """Identify inputs: a finished stage folder by its DONE fingerprint, a file by path, size and mtime (as make
    and rsync do), a plain folder by the data files input_files reads from it."""
    out = []
    for p in map(Path, paths):
        if (fp := done_fingerprint(p)) is not None:
            out.append(fp)
        elif p.is_dir():
            out += input_fingerprints(files_under(p, DATA_SUFFIXES))
        elif p.exists():
            st = p.stat()
            out.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
        else:
            out.append(str(p))
    return out


def _label(key: str) -> str:
    """A settings key as the recipe names it: `output.train.lr` is `train.lr`."""
    return key.removeprefix("output.")


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two recorded settings, as the recipe names them."""
    return [_label(k) for k in diff_keys(old, new)] or ["(unknown)"]


def _describe(old: dict[str, Any], new: dict[str, Any]) -> str:
    def at(tree: Any, key: str) -> Any:
        for part in key.split("."):
            tree = tree.get(part, "(unset)") if isinstance(tree, dict) else "(unset)"
        return tree

    def short(v: Any) -> str:
        text = json.dumps(v, ensure_ascii=False, default=str)
        return text if len(text) <= 60 else text[:57] + "…"

    keys = diff_keys(old, new) or ["(unknown)"]
    return "; ".join(f"{_label(k)}: {short(at(old, k))} → {short(at(new, k))}" for k in keys)


class Stage:
    """One stage's output folder.

    Its settings are everything that shapes the output, in one layout: `output`, the stage's output settings (the
    recipe sections it reads, by name, through config.output_settings, and any version of its own); `model`, the
    identity of the model it uses (None without one); `inputs`, the fingerprints of `inputs` (input_fingerprints).
    Their hash is the fingerprint a DONE marker records. `inputs` are also recorded as paths, the provenance
    reports and cards follow. With `atomic=True` the stage writes into a hidden sibling folder that is renamed
    into place by `finish`, so `out` is complete or absent (a merged model).
    """

    def __init__(self, name: str, out: str | Path, output: dict[str, Any], *, model: Any = None,
                 inputs: list[str | Path] = (), atomic: bool = False):
        self.name = name
        self.inputs = [str(Path(p).resolve()) for p in inputs]
        self.out = Path(out)
        settings = {"output": output, "model": model, "inputs": input_fingerprints(inputs)}
        self.settings = json.loads(json.dumps(redact(settings), default=str))
        self.fingerprint = fingerprint(self.settings)
        self.atomic = atomic
        # Where outputs are written: the folder itself, or (atomic) a sibling renamed into place at the end.
        self.folder = self.out.parent / f".{self.out.name}.partial" if atomic else self.out
        self.lock = FolderLock(self.out)

    def done(self, force: bool = False) -> Done | None:
        """The folder's DONE marker; under `force` one from another version counts as unfinished (it is redone)."""
        try:
            return done_info(self.out)
        except RecordError:
            if force:
                return None
            raise

    def _previous(self, old: Done | None) -> dict[str, Any] | None:
        if old is not None:
            return old.settings
        try:
            return yaml.safe_load((self.folder / CONFIG).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return None

    def check(self, force: bool = False) -> dict[str, Any] | None:
        """Without touching anything: the finished run's stats when the folder is done with these settings (a no-op
        rerun, unless `force`), else None; raises when the folder was made with other settings and not `force`."""
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"{self.out}: exists and is not a folder; give another --out")
        out = self.out.resolve()
        for p in map(Path, self.inputs):
            if out == p or out in p.parents or p in out.parents:
                raise ConfigError(f"{self.name}: the output folder {self.out} and the input {p} overlap; "
                                  "write the output somewhere else")
        old = self.done(force)
        if old is not None and old.fingerprint == self.fingerprint and not force:
            return old.stats
        if not self._holds_work(self.out):
            return None
        previous = self._previous(old)
        if previous is None:
            raise ConfigError(f"{self.out}: holds files that are not an ezoforge {self.name} folder; "
                              "give another --out (nothing was changed)")
        if previous != self.settings and not force:
            what = "made" if old is not None else "partly made"
            raise ConfigError(
                f"{self.name}: {self.out} was {what} with other settings — {_describe(previous, self.settings)}. "
                f"Nothing was changed. Put the old value back to {'keep it' if old else 'resume'}, give another "
                "folder, or use --force to redo this stage (deletes that folder).")
        return None

    def start(self, force: bool = False, keep: tuple[str, ...] = ()) -> dict[str, Any] | None:
        """`check`, then prepare the folder: a partial run with the same settings is kept so the stage resumes;
        under `force` the folder is emptied first, but for `keep` (caches keyed by all that determines each entry);
        atomic stages replace the folder only when the new one is finished. The folder is this process's from here
        until `claimed` ends (refused while another process holds it)."""
        self.lock.acquire()
        try:
            with faults_named(self.folder, self.name):
                finished = self._start(force, keep)
        except BaseException:
            self.lock.release()
            raise
        if finished is not None:
            self.lock.release()
        return finished

    def _start(self, force: bool, keep: tuple[str, ...]) -> dict[str, Any] | None:
        if force and self._held.is_file():
            raise MachineFault(f"{self.out}: {self._held.read_text(encoding='utf-8')} still write into it; rerun "
                               f"without --force to collect their work, or cancel them and delete {self._held} to "
                               "redo the stage")
        finished = self.check(force)
        if finished is not None:
            return finished
        if force and not self.atomic and self._holds_work(self.out):
            for sub in self.out.iterdir():  # a forced redo starts clean
                if sub.name not in keep:
                    shutil.rmtree(sub) if sub.is_dir() else sub.unlink()
        if self.atomic:
            shutil.rmtree(self.folder, ignore_errors=True)  # a killed run's unfinished copy: redone from scratch
        self.folder.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_dump(self.settings, allow_unicode=True, sort_keys=False)
        if not (self.folder / CONFIG).is_file() or (self.folder / CONFIG).read_text(encoding="utf-8") != config:
            write_text(self.folder / CONFIG, config)  # a resume leaves the folder untouched
        return None

    def hold(self, holder: str) -> None:
        """Keep the folder for work this process handed on (Slurm jobs writing into it) after it exits: until the
        rerun that collects it finishes, `--force` is refused, naming the holder."""
        write_text(self._held, holder)

    @property
    def _held(self) -> Path:
        return self.lock.path.with_suffix(".held")

    def reopen(self) -> None:
        """Make a finished folder resumable again (its outputs stay until replaced): a stage that finished with
        failed requests retries them on the next run."""
        (self.out / DONE).unlink(missing_ok=True)

    @contextlib.contextmanager
    def claimed(self):
        """The stage's work; if it fails before writing any output, the folder it claimed is removed again, so
        the corrected command starts afresh (an atomic stage's unfinished copy always goes). A fault of the machine
        (a full disk, memory) is raised as the MachineFault it is."""
        self.lock.acquire()
        try:
            with faults_named(self.folder, self.name):
                try:
                    yield
                except BaseException:
                    if self.folder.is_dir() and (self.atomic or not self._holds_work(self.folder)):
                        shutil.rmtree(self.folder, ignore_errors=True)
                    raise
        finally:
            self.lock.release()

    def finish(self, stats: dict[str, Any]) -> dict[str, Any]:
        write_json(self.folder / "stats.json", stats)
        done = Done(format=RECORD_FORMAT, ezoforge=ezoforge_version(), fingerprint=self.fingerprint, stage=self.name,
                    settings=self.settings, inputs=self.inputs, stats=stats)
        write_json(self.folder / DONE, done.model_dump())
        if self.atomic:  # an old folder is there only under --force: it goes once the new one is in place
            replace_folder(self.folder, self.out)
        self._held.unlink(missing_ok=True)  # collected
        return stats

    @staticmethod
    def _holds_work(folder: Path) -> bool:
        """Anything but the saved config (which a start writes before any work)."""
        return folder.is_dir() and any(p.name != CONFIG for p in folder.iterdir())
