"""What an eval task type declares (EvalTask) and how its items are answered and scored (Scoring).

A task type reads `KIND[:PATH]` specs into items and names the Scoring that answers and scores them. Types that
name the same Scoring are scored in one pass: ELYZA-tasks-100 and MT-Bench answers are generated in one batch,
judged in one round and averaged into one mean. eval/tasks.py registers the types; eval's run, both reports,
`ezo eval compare` and the model card read the figures each Scoring declares (`metrics`) and reports.

A type module imports only what its class bodies need at module level; the work's imports (the cache, the model,
numpy) wait for the work, since `ezo --help` reads the registry.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ezoforge.errors import RecordError
from ezoforge.records import require

if TYPE_CHECKING:
    from ezoforge.cache import RequestCache
    from ezoforge.config import Recipe
    from ezoforge.eval.settings import EvalConfig
    from ezoforge.metric_catalogue import Metric


@dataclass
class Suite:
    spec: str
    task_type: EvalTask
    path: Path | None  # None: read from the hub
    items: list

    @property
    def kind(self) -> str:
        return self.task_type.kind


class EvalTask:
    """One kind of eval task: its spec prefix (also its items' id prefix), where its items come from, how a row
    becomes an item, and the Scoring that answers and scores them."""
    kind: ClassVar[str]
    scoring: ClassVar[type[Scoring]]
    hub: ClassVar[tuple[str, str] | None] = None  # (dataset, split) read when the spec names no file
    prompt_version: ClassVar[str | None] = None  # the judge prompt its answers are graded with; None: not judged
    turns: ClassVar[int] = 1  # user turns per question, each answered (and judged): `ezo plan` counts them

    def spec_words(self) -> str:
        """How its spec is written (`--tasks`' help)."""
        return f"{self.kind}[:PATH]" if self.hub else f"{self.kind}:PATH"

    def item(self, where: str, lineno: int, row: dict[str, Any], position: int) -> Any:
        """The item a row holds; a bad row raises RecordError naming `where:lineno` and the field."""
        raise NotImplementedError

    def finish(self, items: list, cfg: EvalConfig | None) -> list:
        """The items completed by the eval settings (MT-Bench: reference answers from a file)."""
        return items

    def inputs(self, cfg: EvalConfig) -> list[Path]:
        """Files its items are read from besides the suite's own (fingerprinted with the eval's inputs)."""
        return []

    def check(self, suite: Suite, cfg: EvalConfig) -> None:
        """Refuse, before any work, a suite these settings cannot run."""


def prompt_versions(suites: list[Suite]) -> str:
    """The judge prompts of the judged suites, in suite order: what the eval's grades are comparable under."""
    return "+".join(s.task_type.prompt_version for s in suites if s.task_type.prompt_version)


@dataclass
class Context:
    """What scoring needs of the eval: the recipe, the model's identity (`fp`) and name, the models (eval.run's
    `_Models`: `generator`, `scorer`, `loaded`, `answer_identity`), the request cache, the counts stats.json keeps,
    and the judge (None when the eval is not judged)."""
    recipe: Recipe
    fp: str
    model_name: str
    models: Any
    cache: RequestCache
    counts: Counter
    judge: Any = None


class Scoring:
    """How the items of the task types that name it are answered and scored, and the figures that come of it.

    An eval makes one of each registered Scoring, with the suites of its types (perhaps none: report.json keeps its
    keys, with no figures). Across all of them, `answer` runs first (the model's work), then `grade` (the judge's),
    then the figures are read: `header`, `figures` and `breakdowns` are report.json's parts, in that order."""
    metrics: ClassVar[dict[str, Metric]] = {}  # its headline figures (report.json keys) and how each reads
    summary_keys: ClassVar[tuple[str, ...]] = ()  # its report.json keys the run report keeps of an eval
    contaminable: ClassVar[bool] = False  # its items are looked up in the training data before any answering
    # Scored from the model's own likelihoods in eval's process, whatever eval.backend answers with: `ezo plan`
    # counts the model's weights there.
    loads_model: ClassVar[bool] = False

    def __init__(self, types: list[EvalTask], suites: list[Suite]):
        self.types, self.suites = types, suites
        self.items = [it for s in suites for it in s.items]

    def answer(self, ctx: Context) -> None:
        """Answer and score every item with the model."""

    def grade(self, ctx: Context) -> None:
        """After every Scoring has answered: the judge's verdicts."""

    def header(self, ctx: Context) -> dict:
        """report.json's keys before the protocol (who graded)."""
        return {}

    def figures(self, ctx: Context) -> dict:
        """report.json's headline figures."""
        return {}

    def breakdowns(self, ctx: Context) -> dict:
        """report.json's figures by part (suite, category, task), after every Scoring's headline figures."""
        return {}

    def files(self) -> dict[str, list[dict]]:
        """Rows written beside report.json (a file only when it has rows), by file name."""
        return {}

    def words(self, report: dict) -> list[tuple[str, str]]:
        """The eval report's lines for its figures in `report`, those the run has only."""
        return []


# ---------------------------------------------------------------- reading rows

def row_key(where: str, lineno: int, row: dict[str, Any], field: str, position: int) -> str:
    """An item's KEY: the row's own id in `field`, else its 1-based position."""
    value = row.get(field)
    if value is None:
        return str(position)
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise RecordError(f"{where}:{lineno}: field '{field}' must be a string or integer")
    return str(value)


def row_strings(where: str, lineno: int, row: dict[str, Any], field: str) -> list[str]:
    value = require(where, lineno, row, field, list)
    if not value or not all(isinstance(v, str) for v in value):
        raise RecordError(f"{where}:{lineno}: field '{field}' must be a non-empty list of strings")
    return value
