"""Japanese MT-Bench judged as FastChat judges MT-Bench: single-answer grading on 1–10 with "[[rating]]",
reference-guided for math, reasoning and coding, and the multi-turn prompts for the second turn.

The prompt texts are FastChat's own, unchanged (lm-sys/FastChat, fastchat/llm_judge/data/judge_prompts.jsonl,
last changed in commit 7ad1d6386288ba1a7862c11feb673425713eea5b; Apache-2.0): single-v1, single-math-v1,
single-v1-multi-turn and single-math-v1-multi-turn. Stability AI's jp-stable fork defaults to Japanese
translations of the first two only, so the multi-turn judge there is not defined; the English set is complete.

Ours, not FastChat's: a rating must be in 1–10 and every [[n]] in a verdict must agree (FastChat takes the
first match), and an unreadable verdict is re-asked (FastChat records -1 and drops it).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from ezoforge.eval.judge_prompt import Verdict
from ezoforge.eval.items import OpenTask

PROMPT_VERSION = "fastchat-mt-bench-single-v1"
SCALE = (1, 10)
NEED_REF_CATS = ("math", "reasoning", "coding")  # FastChat's NEED_REF_CATS

_RATE = ('After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following '
         'this format: "[[rating]]", for example: "Rating: [[5]]".')
_ANSWER = "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
_CONVERSATION = ("<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n"
                 "### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
                 "<|The End of Assistant A's Conversation with User|>")


@dataclass(frozen=True)
class Prompt:
    name: str
    system: str
    template: str


PROMPTS = {p.name: p for p in (
    Prompt("single-v1", "You are a helpful assistant.",
           "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
           "assistant to the user question displayed below. Your evaluation should consider factors such as the "
           "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your "
           f"evaluation by providing a short explanation. Be as objective as possible. {_RATE}\n\n"
           "[Question]\n{question}\n\n" + _ANSWER),
    Prompt("single-math-v1", "You are a helpful assistant.",
           "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
           "assistant to the user question displayed below. Your evaluation should consider correctness and "
           "helpfulness. You will be given a reference answer and the assistant's answer. Begin your evaluation by "
           "comparing the assistant's answer with the reference answer. Identify and correct any mistakes. Be as "
           f"objective as possible. {_RATE}\n\n[Question]\n{{question}}\n\n"
           "[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference Answer]\n\n" + _ANSWER),
    Prompt("single-v1-multi-turn",
           "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
           "the user question displayed below. Your evaluation should consider factors such as the helpfulness, "
           "relevance, accuracy, depth, creativity, and level of detail of the response. You evaluation should focus "
           "on the assistant's answer to the second user question. Begin your evaluation by providing a short "
           f"explanation. Be as objective as possible. {_RATE}\n\n",
           _CONVERSATION),
    Prompt("single-math-v1-multi-turn",
           "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
           "the user question. Your evaluation should consider correctness and helpfulness. You will be given a "
           "reference answer and the assistant's answer. You evaluation should focus on the assistant's answer to the "
           "second question. Begin your evaluation by comparing the assistant's answer with the reference answer. "
           f"Identify and correct any mistakes. Be as objective as possible. {_RATE}\n\n",
           "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n{ref_answer_1}\n\n"
           "### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n<|The End of Reference Answer|>\n\n\n"
           + _CONVERSATION),
)}

REASK = ('Your output could not be read ({problem}). Output your rating by strictly following this format: '
         '"[[rating]]", for example: "Rating: [[5]]".')


def needs_reference(task: OpenTask) -> bool:
    return task.category in NEED_REF_CATS


def prompt_for(task: OpenTask, turn: int) -> Prompt:
    """FastChat's choice: math-style (reference-guided) for NEED_REF_CATS, multi-turn for the second turn."""
    return PROMPTS[("single-math-v1" if needs_reference(task) else "single-v1") + ("-multi-turn" if turn == 2 else "")]


def judge_messages(task: OpenTask, answers: list[str], turn: int) -> tuple[str, list[dict[str, str]]]:
    """(the prompt's name, the messages) judging `answers[turn - 1]`, the model's answers to the task's turns."""
    prompt = prompt_for(task, turn)
    refs = {f"ref_answer_{i}": r for i, r in enumerate(task.references, 1)} if needs_reference(task) else {}
    if turn == 1:
        user = prompt.template.format(question=task.turns[0], answer=answers[0], **refs)
    else:
        user = prompt.template.format(question_1=task.turns[0], answer_1=answers[0], question_2=task.turns[1],
                                      answer_2=answers[1], **refs)
    return prompt.name, [{"role": "system", "content": prompt.system}, {"role": "user", "content": user}]


# FastChat's one_score_pattern and its backup.
_DOUBLE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_SINGLE = re.compile(r"\[(\d+\.?\d*)\]")


def parse_rating(raw: str) -> Verdict:
    """The [[rating]] in a verdict (else a lone [rating]); the whole output is its reason."""
    text = unicodedata.normalize("NFKC", raw)  # full-width brackets and digits
    for pattern in (_DOUBLE, _SINGLE):
        values = {float(v) for v in pattern.findall(text)}
        if len(values) > 1:
            return Verdict(None, "", f"conflicting ratings {sorted(values)}")
        if values:
            value = values.pop()
            if not SCALE[0] <= value <= SCALE[1]:
                return Verdict(None, "", f"rating {value:g} is outside 1-10")
            return Verdict(int(value) if value.is_integer() else value, raw.strip())
    return Verdict(None, "", "no [[rating]] found")
