"""The eval task types (one module each in eval/task_types/) and task specs, `KIND[:PATH]`, read into suites.

Item ids are `KIND/KEY` (KEY: the row's own id, else its 1-based position), independent of the file's path,
so runs over different copies of the same benchmark pair up task by task in `ezo eval compare`.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ezoforge.errors import ConfigError, EzoError, RecordError
from ezoforge.eval.settings import EvalConfig
from ezoforge.eval.task_types.base import EvalTask, Scoring, Suite
from ezoforge.eval.task_types.elyza100 import Elyza100
from ezoforge.eval.task_types.jcqa import Jcqa
from ezoforge.eval.task_types.mt_bench_ja import MtBenchJa
from ezoforge.eval.task_types.ppl import Ppl
from ezoforge.records import read_jsonl

# The registry: a new task type is a module in eval/task_types/ and its line here.
TASK_TYPES: dict[str, EvalTask] = {t.kind: t for t in (Elyza100(), MtBenchJa(), Jcqa(), Ppl())}

# Each way of answering and scoring once, in registry order: the order an eval answers in and reports figures in.
SCORINGS: list[type[Scoring]] = list(dict.fromkeys(t.scoring for t in TASK_TYPES.values()))
# Every figure an eval reports as a headline, with its label, direction and format (metric_catalogue.Metric).
METRICS = {key: metric for scoring in SCORINGS for key, metric in scoring.metrics.items()}
SUMMARY_KEYS = tuple(key for scoring in SCORINGS for key in scoring.summary_keys)
SPEC_HELP = ", ".join(t.spec_words() for _, t in sorted(TASK_TYPES.items()))


def scorings(suites: list[Suite] = ()) -> list[Scoring]:
    """A Scoring of each kind, holding the suites of its types."""
    return [cls([t for t in TASK_TYPES.values() if t.scoring is cls],
                [s for s in suites if s.task_type.scoring is cls]) for cls in SCORINGS]


def parse_spec(spec: str) -> tuple[str, Path | None]:
    kind, sep, path = spec.strip().partition(":")
    if kind not in TASK_TYPES:
        raise ConfigError(f"task spec {spec!r}: unknown task '{kind}' (known: {', '.join(TASK_TYPES)}; "
                          "add :PATH for a file)")
    if sep and not path:
        raise ConfigError(f"task spec {spec!r}: empty PATH after ':'")
    if not sep and TASK_TYPES[kind].hub is None:
        raise ConfigError(f"task spec {spec!r}: {kind} needs a file, e.g. {kind}:PATH")
    return kind, Path(path).expanduser() if sep else None


def _hub_rows(task_type: EvalTask, spec: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    repo, split = task_type.hub
    try:
        import datasets

        rows = datasets.load_dataset(repo, split=split)
    except Exception as e:  # offline, gated, renamed: every cause ends in the same advice
        raise EzoError(f"{spec}: cannot load {repo} ({split}) from the Hugging Face hub ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); download it and pass "
                       f"{task_type.kind}:PATH") from None
    for n, row in enumerate(rows, 1):
        yield f"{repo}[{split}]", n, dict(row)


def _file_rows(path: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    for lineno, row in read_jsonl(path):
        yield str(path), lineno, row


def load_suite(spec: str, limit: int | None = None, cfg: EvalConfig | None = None) -> Suite:
    """The first `limit` items of a task spec, in input order, completed by the eval settings `cfg` (MT-Bench's
    reference answers); bad rows raise RecordError naming FILE:LINE."""
    kind, path = parse_spec(spec)
    task_type = TASK_TYPES[kind]
    if path is not None and not path.is_file():
        raise RecordError(f"{path}: no such file (task spec {spec!r})")
    rows = _file_rows(path) if path is not None else _hub_rows(task_type, spec)
    items, seen = [], set()
    for position, (where, lineno, row) in enumerate(rows, 1):
        if limit is not None and position > limit:
            break
        item = task_type.item(where, lineno, row, position)
        if item.id in seen:
            raise RecordError(f"{where}:{lineno}: duplicate id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise RecordError(f"{path or spec}: no items")
    return Suite(spec, task_type, path, task_type.finish(items, cfg))


def load_suites(specs: list[str], limit: int | None = None, cfg: EvalConfig | None = None) -> list[Suite]:
    suites = [load_suite(s, limit, cfg) for s in specs]
    kinds = [s.kind for s in suites]
    for kind in set(kinds):
        if kinds.count(kind) > 1:
            raise ConfigError(f"tasks: {kind} is given more than once (item ids would collide)")
    return suites
