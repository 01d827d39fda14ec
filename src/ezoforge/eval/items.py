"""The items eval task types load (eval/task_types/): judge prompts, likelihood scoring and the contamination check
read them too."""
from __future__ import annotations

from dataclasses import dataclass


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
