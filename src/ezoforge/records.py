"""Records that flow between stages, and the IO every stage shares.

Readers name FILE:LINE and the field on bad input; writers go through a temporary name and an
atomic rename so a killed run never leaves a half-written file under a final name.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ezoforge.errors import RecordError

if TYPE_CHECKING:  # pyarrow loads where Parquet is read or written: importing records (`ezo --help`) stays light
    import pyarrow as pa

DONE = "DONE"
# The layout of what a stage folder records (DONE, config.yaml). A folder recorded in another is refused in plain
# words (stage.done_info) rather than read wrongly.
RECORD_FORMAT = 1


@functools.cache
def ezoforge_version() -> str:
    """The installed ezoforge's version: `ezo --version`, and what a DONE marker records."""
    from importlib.metadata import version

    return version("ezoforge")


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Document(Record):
    id: str
    text: str
    source: str
    title: str | None = None
    url: str | None = None
    meta: dict[str, Any] = {}


class Pair(Record):
    id: str
    doc_id: str
    instruction: str
    response: str
    context: str | None = None
    generator: str
    source: str | None = None  # the document's source (wikipedia, fineweb, ...), for the per-source mix


class Done(Record):
    """A finished stage folder's DONE marker, written last. `settings` is the stage's layout (stage.SETTINGS), whose
    hash is `fingerprint`; `inputs` are the paths it read, the lineage reports and cards follow (stage.lineage)."""
    format: int
    ezoforge: str  # the version that wrote it
    fingerprint: str
    stage: str
    settings: dict[str, Any]
    inputs: list[str]
    stats: dict[str, Any]


class Judgement(Record):
    """One verdict on one answer: a row of an eval's judgements.jsonl, written by the judge client and read back
    through `read_judgements`."""

    task_id: str
    model: str
    answer: str
    judge: str  # the name it was asked for
    grade: int | float | None = Field(None, ge=1, le=10)  # on the protocol's scale: ELYZA 1-5, MT-Bench 1-10
    error: str | None = None
    reason: str = ""
    prompt_version: str
    prompt: str | None = None  # the protocol's prompt used (MT-Bench: single-v1, single-math-v1-multi-turn, ...)
    sample: int = 0
    turn: int = 1
    judgment: int = 0
    judge_served: str | None = None  # the `model` the judge's response reported; None: no request was needed
    system_fingerprint: str | None = None


# ---------------------------------------------------------------- atomic writes

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600: give the file the permissions a plain open() would
    try:
        yield Path(tmp)
        # Data on disk before the name: after a power loss the file is the old one or the whole new one.
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(new: str | Path, final: str | Path) -> None:
    """Put the finished folder `new` at `final` by renames, so `final` is always a whole folder: the old one until
    the new one is in place. The files' data reach the disk before the new folder gets its name."""
    new, final = Path(new), Path(final)
    for f in new.rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    path = Path(path)
    with atomic_path(path) as tmp:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(tmp, "wt", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
    return n


def write_parquet(path: str | Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return len(rows)


# ---------------------------------------------------------------- reading

def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="strict")
    return open(path, encoding="utf-8", errors="strict")


def read_jsonl(path: str | Path, on_error: str = "fail") -> Iterator[tuple[int, dict[str, Any] | RecordError]]:
    """Yield (line number, object). A bad line raises RecordError, or with on_error="skip" is yielded as one."""
    path = Path(path)
    try:
        with _open_text(path) as f:
            lineno = 0
            while True:
                try:
                    line = f.readline()
                except UnicodeDecodeError as e:
                    raise RecordError(f"{path}:{lineno + 1}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                if not line:
                    break
                lineno += 1
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    if not isinstance(obj, dict):
                        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                except ValueError as e:
                    err = RecordError(f"{path}:{lineno}: invalid JSON: {e}")
                    if on_error == "skip":
                        yield lineno, err
                        continue
                    raise err from None
                yield lineno, obj
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise RecordError(f"{path}: no such file") from None
        raise RecordError(f"{path}: truncated or corrupt compressed file ({e})") from None


def read_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row number, row) from JSONL, JSONL.gz or Parquet; the number is 1-based."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise RecordError(f"{path}: not a readable Parquet file ({e})") from None
        n = 0
        for batch in pf.iter_batches():
            for row in batch.to_pylist():
                n += 1
                yield n, row
        return
    if path.name.endswith((".jsonl", ".jsonl.gz", ".json")):
        yield from read_jsonl(path)  # type: ignore[misc]
        return
    raise RecordError(f"{path}: unsupported file type (expected .jsonl, .jsonl.gz or .parquet)")


class EvalReport(Record):
    """An eval's report.json as every reader needs it: what was scored (`model`, `tasks`) and whether its verdicts
    are whole (`status`). Each task type's Scoring adds its own figures beside these (`eval.run`)."""

    model_config = ConfigDict(extra="allow")
    model: dict[str, Any]
    tasks: list[str]
    n_tasks: int
    status: str
    judge: dict[str, Any] | None = None


def read_eval_report(path: str | Path) -> dict[str, Any]:
    """An eval's report.json, checked against `EvalReport` (a report that is not one raises, naming the file and the
    field), as written: its keys in their order."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RecordError(f"{path}: invalid JSON: {e}") from None
    try:
        EvalReport.model_validate(report)
    except ValidationError as e:
        raise _refused(str(path), e) from None
    return report


def _refused(where: str, e: ValidationError) -> RecordError:
    """A record that is not its type, named by where it is and its first wrong field."""
    err = e.errors()[0]
    return RecordError(f"{where}: {err['loc'][0] if err['loc'] else 'record'}: {err['msg']}")


def read_judgements(path: str | Path) -> list[dict[str, Any]]:
    """An eval's judgements.jsonl, each row checked against `Judgement` (a row that is not one raises, naming FILE:LINE
    and the field); none where the eval judged nothing."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for lineno, row in read_jsonl(path):
        try:
            rows.append(Judgement.model_validate(row).model_dump())
        except ValidationError as e:
            raise _refused(f"{path}:{lineno}", e) from None
    return rows


def require(path: str | Path, lineno: int, row: dict[str, Any], field: str, kind: type = str) -> Any:
    """A field's value, or a RecordError naming FILE:LINE and the field."""
    if field not in row or row[field] is None:
        raise RecordError(f"{path}:{lineno}: missing field '{field}'")
    value = row[field]
    if not isinstance(value, kind):
        raise RecordError(f"{path}:{lineno}: field '{field}' must be {kind.__name__}, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- input files

# What stages write into data/ and read back (read_rows).
DATA_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")
# The corpora curate reads, by file name ending, and the source each is.
CORPUS_SOURCES = {".xml": "wikipedia", ".xml.bz2": "wikipedia", ".parquet": "fineweb", ".jsonl": "jsonl",
                  ".jsonl.gz": "jsonl"}
CORPUS_SUFFIXES = tuple(CORPUS_SOURCES)


def corpus_suffix(path: str | Path) -> str:
    name = Path(path).name
    for s in sorted(CORPUS_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    raise RecordError(f"{path}: unsupported input type (expected {', '.join(CORPUS_SUFFIXES)})")


def files_under(folder: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The one walk of an input folder: every file at any depth below it whose name ends in one of `suffixes`,
    sorted by path. Any depth, because downloaded corpora nest their shards (FineWeb-2: data/LANG/train/*.parquet)."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name.endswith(suffixes))
