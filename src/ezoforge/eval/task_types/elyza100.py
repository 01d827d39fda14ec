"""ELYZA-tasks-100: one-turn open tasks with a reference answer and grading notes, judged 1–5 with our Japanese
prompt applying ELYZA's rubric (judge_prompt.py), and scored with chrF against the reference."""
from __future__ import annotations

from typing import Any

from ezoforge.errors import RecordError
from ezoforge.eval import judge_prompt
from ezoforge.eval.items import OpenTask
from ezoforge.eval.task_types.judged import JudgedTask
from ezoforge.records import require


class Elyza100(JudgedTask):
    kind = "elyza100"
    hub = ("elyza/ELYZA-tasks-100", "test")
    prompt_version = judge_prompt.PROMPT_VERSION
    scale = judge_prompt.SCALE
    benchmark = "ELYZA-tasks-100"

    def item(self, where: str, lineno: int, row: dict[str, Any], position: int) -> OpenTask:
        aspect = row.get("eval_aspect")
        if aspect is not None and not isinstance(aspect, str):
            raise RecordError(f"{where}:{lineno}: field 'eval_aspect' must be str")
        return OpenTask(f"elyza100/{position}", require(where, lineno, row, "input"),
                        require(where, lineno, row, "output"), (aspect or "").strip() or None)

    def response_format(self, reason_max_chars: int) -> dict:
        return judge_prompt.verdict_schema(reason_max_chars)

    def verdict(self, ask, unit, reasks: int) -> judge_prompt.Verdict:
        return judge_prompt.judge_answer(ask, unit.task, unit.answers[-1], reasks)
