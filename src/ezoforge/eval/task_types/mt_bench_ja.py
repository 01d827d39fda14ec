"""Japanese MT-Bench (`mt-bench-ja:PATH`): FastChat question rows `{question_id, category, turns}` of one or two
turns, judged 1–10 as FastChat judges MT-Bench (mt_bench.py), with FastChat's table by category and by turn.

Reference answers for the categories MT-Bench judges against one come from a row's `reference` list or from an
answer file in FastChat's format (`{question_id, choices: [{turns}]}`, e.g. Japanese MT-Bench's
reference_answer/*.jsonl) named by eval.mt_bench_references.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ezoforge.errors import RecordError
from ezoforge.eval import metrics, mt_bench
from ezoforge.eval.items import OpenTask
from ezoforge.eval.judge_prompt import Verdict, converse
from ezoforge.eval.settings import EvalConfig
from ezoforge.eval.task_types.base import Suite, row_key, row_strings
from ezoforge.eval.task_types.judged import JudgedTask
from ezoforge.records import read_jsonl, require


def load_references(path: Path) -> dict[str, tuple[str, ...]]:
    """question_id -> per-turn reference answers, from a FastChat answer file (its first choice)."""
    if not path.is_file():
        raise RecordError(f"{path}: no such file (eval.mt_bench_references)")
    out = {}
    for lineno, row in read_jsonl(path):
        choices = require(path, lineno, row, "choices", list)
        if not choices or not isinstance(choices[0], dict):
            raise RecordError(f"{path}:{lineno}: field 'choices' must hold at least one {{\"turns\": [...]}}")
        out[row_key(str(path), lineno, row, "question_id", lineno)] = tuple(
            row_strings(str(path), lineno, choices[0], "turns"))
    return out


class MtBenchJa(JudgedTask):
    kind = "mt-bench-ja"
    turns = 2
    prompt_version = mt_bench.PROMPT_VERSION
    scale = mt_bench.SCALE
    benchmark = "Japanese MT-Bench"
    breakdown_key = "mt_bench"

    def item(self, where: str, lineno: int, row: dict[str, Any], position: int) -> OpenTask:
        turns = row_strings(where, lineno, row, "turns")
        if len(turns) not in (1, 2):  # MT-Bench's judge prompts cover one or two turns
            raise RecordError(f"{where}:{lineno}: field 'turns' must hold 1 or 2 strings, got {len(turns)}")
        return OpenTask(f"mt-bench-ja/{row_key(where, lineno, row, 'question_id', position)}", turns[0], None, None,
                        require(where, lineno, row, "category"), tuple(turns[1:]),
                        tuple(row_strings(where, lineno, row, "reference")) if row.get("reference") is not None
                        else ())

    def finish(self, items: list[OpenTask], cfg: EvalConfig | None) -> list[OpenTask]:
        """Questions that carry no reference answers take them from eval.mt_bench_references."""
        if cfg is None or cfg.mt_bench_references is None:
            return items
        refs = load_references(cfg.mt_bench_references)
        return [it if it.references else replace(it, references=refs.get(it.id.split("/", 1)[1], ())) for it in items]

    def inputs(self, cfg: EvalConfig) -> list[Path]:
        return [cfg.mt_bench_references] if cfg.mt_bench_references else []

    def check(self, suite: Suite, cfg: EvalConfig) -> None:
        """MT-Bench judges math, reasoning and coding against reference answers: without them it cannot be judged."""
        if not cfg.judge_model:
            return
        for t in suite.items:
            if mt_bench.needs_reference(t) and len(t.references) < len(t.turns):
                raise RecordError(f"{suite.path}: question {t.id} ({t.category}) has {len(t.references)} reference "
                                  f"answer(s) for {len(t.turns)} turn(s); MT-Bench's judge compares {t.category} "
                                  "answers with one: set eval.mt_bench_references to a FastChat reference answer "
                                  "file, or give the question a `reference` list")

    def verdict(self, ask, unit, reasks: int) -> Verdict:
        _, messages = mt_bench.judge_messages(unit.task, list(unit.answers), unit.turn)
        return converse(ask, messages, reasks, mt_bench.parse_rating, mt_bench.REASK)

    def prompt_name(self, unit) -> str:
        return mt_bench.prompt_for(unit.task, unit.turn).name

    def breakdown(self, tasks: list[OpenTask], judgements: list[dict], boot: tuple[int, int]) -> dict:
        """FastChat's MT-Bench table: the mean by category and by turn (1–10), each a mean over questions."""
        def mean(subset: list[dict]) -> dict:
            per_task = {t: g for t, g in metrics.task_grades(subset).items() if g}
            if not per_task:
                return {"n_tasks": 0, "mean_grade": None, "ci95": None}
            m, ci = metrics.mean_over_tasks(per_task, *boot)
            return {"n_tasks": len(per_task), "mean_grade": metrics.rounded(m),
                    "ci95": [metrics.rounded(x) for x in ci]}

        category = {t.id: t.category for t in tasks}
        return {"by_category": {c: mean([j for j in judgements if category[j["task_id"]] == c])
                                for c in sorted({t.category for t in tasks})},
                "by_turn": {str(k): mean([j for j in judgements if j["turn"] == k]) for k in (1, 2)}}

    def breakdown_words(self, figures: dict | None) -> list[tuple[str, str]]:
        from ezoforge.report_kit import fmt

        figures = figures or {}
        return [(f"MT-Bench turn {name} (1–10)", fmt(fig["mean_grade"])) for name, fig in
                (figures.get("by_turn") or {}).items()] + \
               [(f"MT-Bench {name} (1–10)", fmt(fig["mean_grade"])) for name, fig in
                (figures.get("by_category") or {}).items()]
