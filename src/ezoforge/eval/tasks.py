"""Task specs (`elyza100`, `elyza100:PATH`, `jcqa[:PATH]`, `mt-bench-ja:PATH`, `ppl:PATH`) and their items.

`mt-bench-ja:PATH` reads FastChat question rows `{question_id, category, turns}`; reference answers for the
categories MT-Bench judges against one come from a row's `reference` list or from an answer file in FastChat's
format (`{question_id, choices: [{turns}]}`, e.g. Japanese MT-Bench's reference_answer/*.jsonl).

Item ids are `KIND/KEY` (KEY: the row's own id, else its 1-based position), independent of the file's path,
so runs over different copies of the same benchmark pair up task by task in `ezo eval compare`.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
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
    prompt: str  # the first (for ELYZA the only) user turn
    reference: str | None  # an answer to score chrF against (ELYZA)
    aspect: str | None
    category: str | None = None  # MT-Bench's
    later_turns: tuple[str, ...] = ()  # user turns asked after the model's own previous answer
    references: tuple[str, ...] = ()  # per-turn reference answers the judge is shown (MT-Bench)

    @property
    def turns(self) -> tuple[str, ...]:
        return (self.prompt, *self.later_turns)


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
        turns = _strings(where, lineno, row, "turns")
        if len(turns) not in (1, 2):  # MT-Bench's judge prompts cover one or two turns
            raise RecordError(f"{where}:{lineno}: field 'turns' must hold 1 or 2 strings, got {len(turns)}")
        return OpenTask(f"mt-bench-ja/{_key(where, lineno, row, 'question_id', position)}", turns[0], None, None,
                        require(where, lineno, row, "category"), tuple(turns[1:]),
                        tuple(_strings(where, lineno, row, "reference")) if row.get("reference") is not None else ())
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


def _strings(where: str, lineno: int, row: dict[str, Any], field: str) -> list[str]:
    value = require(where, lineno, row, field, list)
    if not value or not all(isinstance(v, str) for v in value):
        raise RecordError(f"{where}:{lineno}: field '{field}' must be a non-empty list of strings")
    return value


def load_references(path: Path) -> dict[str, tuple[str, ...]]:
    """question_id -> per-turn reference answers, from a FastChat answer file (its first choice)."""
    if not path.is_file():
        raise RecordError(f"{path}: no such file (eval.mt_bench_references)")
    out = {}
    for lineno, row in read_jsonl(path):
        choices = require(path, lineno, row, "choices", list)
        if not choices or not isinstance(choices[0], dict):
            raise RecordError(f"{path}:{lineno}: field 'choices' must hold at least one {{\"turns\": [...]}}")
        out[_key(str(path), lineno, row, "question_id", lineno)] = tuple(_strings(str(path), lineno, choices[0], "turns"))
    return out


def load_suite(spec: str, limit: int | None = None, references: Path | None = None) -> Suite:
    """The first `limit` items of a task spec, in input order; bad rows raise RecordError naming FILE:LINE.

    `references`: an MT-Bench reference answer file, filling `references` of questions that carry none."""
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
    if kind == "mt-bench-ja" and references is not None:
        refs = load_references(references)
        items = [it if it.references else replace(it, references=refs.get(it.id.split("/", 1)[1], ()))
                 for it in items]
    return Suite(spec, kind, path, items)


def load_suites(specs: list[str], limit: int | None = None, references: Path | None = None) -> list[Suite]:
    suites = [load_suite(s, limit, references) for s in specs]
    kinds = [s.kind for s in suites]
    for kind in set(kinds):
        if kinds.count(kind) > 1:
            raise ConfigError(f"tasks: {kind} is given more than once (item ids would collide)")
    return suites
