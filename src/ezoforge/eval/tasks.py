"""Task specs (`elyza100`, `elyza100:PATH`, `jcqa[:PATH]`, `mt-bench-ja:PATH`, `ppl:PATH`) and their items.

Item ids are `KIND/KEY` (KEY: the row's own id, else its 1-based position), independent of the file's path,
so runs over different copies of the same benchmark pair up task by task in `ezo eval compare`.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ezoforge.errors import ConfigError, EzoError, RecordError
from ezoforge.records import read_jsonl, require

HUB = {"elyza100": ("elyza/ELYZA-tasks-100", "test"), "jcqa": ("sbintuitions/JCommonsenseQA", "validation")}
OPEN_KINDS = ("elyza100", "mt-bench-ja")  # answered by generation, judged and scored with chrF
KINDS = OPEN_KINDS + ("jcqa", "ppl")


@dataclass(frozen=True)
class OpenTask:
    id: str
    prompt: str
    reference: str | None
    aspect: str | None


@dataclass(frozen=True)
class ChoiceItem:
    id: str
    question: str
    choices: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class Passage:
    id: str
    text: str


@dataclass
class Suite:
    spec: str
    kind: str
    path: Path | None  # None: read from the hub
    items: list


def parse_spec(spec: str) -> tuple[str, Path | None]:
    kind, sep, path = spec.strip().partition(":")
    if kind not in KINDS:
        raise ConfigError(f"task spec {spec!r}: unknown task '{kind}' (known: {', '.join(KINDS)}; add :PATH for a file)")
    if sep and not path:
        raise ConfigError(f"task spec {spec!r}: empty PATH after ':'")
    if not sep and kind not in HUB:
        raise ConfigError(f"task spec {spec!r}: {kind} needs a file, e.g. {kind}:PATH")
    return kind, Path(path).expanduser() if sep else None


def _hub_rows(kind: str, spec: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    repo, split = HUB[kind]
    try:
        import datasets

        rows = datasets.load_dataset(repo, split=split)
    except Exception as e:  # offline, gated, renamed: every cause ends in the same advice
        raise EzoError(f"{spec}: cannot load {repo} ({split}) from the Hugging Face hub ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); download it and pass {kind}:PATH") from None
    for n, row in enumerate(rows, 1):
        yield f"{repo}[{split}]", n, dict(row)


def _file_rows(path: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    for lineno, row in read_jsonl(path):
        yield str(path), lineno, row


def _key(where: str, lineno: int, row: dict[str, Any], field: str, position: int) -> str:
    value = row.get(field)
    if value is None:
        return str(position)
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise RecordError(f"{where}:{lineno}: field '{field}' must be a string or integer")
    return str(value)


def _item(kind: str, where: str, lineno: int, row: dict[str, Any], position: int):
    if kind == "elyza100":
        aspect = row.get("eval_aspect")
        if aspect is not None and not isinstance(aspect, str):
            raise RecordError(f"{where}:{lineno}: field 'eval_aspect' must be str")
        return OpenTask(f"elyza100/{position}", require(where, lineno, row, "input"),
                        require(where, lineno, row, "output"), (aspect or "").strip() or None)
    if kind == "mt-bench-ja":
        turns = require(where, lineno, row, "turns", list)
        if not turns or not isinstance(turns[0], str):
            raise RecordError(f"{where}:{lineno}: field 'turns' must hold at least one string")
        # Only the first turn is asked: the rubric and judge prompt are single-turn.
        return OpenTask(f"mt-bench-ja/{_key(where, lineno, row, 'question_id', position)}", turns[0], None, None)
    if kind == "jcqa":
        choices = tuple(require(where, lineno, row, f"choice{i}") for i in range(5))
        if not all(c.strip() for c in choices):
            raise RecordError(f"{where}:{lineno}: an empty choice cannot be scored")
        label = require(where, lineno, row, "label", int)
        if not 0 <= label < 5:
            raise RecordError(f"{where}:{lineno}: field 'label' must be 0..4, got {label}")
        return ChoiceItem(f"jcqa/{_key(where, lineno, row, 'q_id', position)}",
                          require(where, lineno, row, "question"), choices, label)
    return Passage(f"ppl/{_key(where, lineno, row, 'id', position)}", require(where, lineno, row, "text"))


def load_suite(spec: str, limit: int | None = None) -> Suite:
    """The first `limit` items of a task spec, in input order; bad rows raise RecordError naming FILE:LINE."""
    kind, path = parse_spec(spec)
    if path is not None and not path.is_file():
        raise RecordError(f"{path}: no such file (task spec {spec!r})")
    rows = _file_rows(path) if path is not None else _hub_rows(kind, spec)
    items, seen = [], set()
    for position, (where, lineno, row) in enumerate(rows, 1):
        if limit is not None and position > limit:
            break
        item = _item(kind, where, lineno, row, position)
        if item.id in seen:
            raise RecordError(f"{where}:{lineno}: duplicate id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise RecordError(f"{path or spec}: no items")
    return Suite(spec, kind, path, items)


def load_suites(specs: list[str], limit: int | None = None) -> list[Suite]:
    suites = [load_suite(s, limit) for s in specs]
    kinds = [s.kind for s in suites]
    for kind in set(kinds):
        if kinds.count(kind) > 1:
            raise ConfigError(f"tasks: {kind} is given more than once (item ids would collide)")
    return suites
