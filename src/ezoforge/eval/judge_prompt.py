"""The LLM judge: our versioned Japanese prompt applying ELYZA-tasks-100's published rubric, a strict verdict
parser, and bounded re-asks.

A verdict is a grade 1–5 or a failure: output that is empty, ambiguous, out of range or not a whole number
never becomes a grade by guessing.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from ezoforge.eval.items import OpenTask

PROMPT_VERSION = "ezo-judge-ja-v1"
SCALE = (1, 5)
EMPTY_ANSWER_REASON = "empty answer: graded 1 without a judge call"

SYSTEM = "あなたは日本語の回答を公正かつ厳格に採点する評価者です。指示された形式だけで出力してください。"

RUBRIC = """採点基準（1〜5 の整数）:
- 1点: 誤っている、または指示に従っていない
- 2点: 誤っているが、方向性は合っている
- 3点: 部分的に誤っている、部分的に合っている
- 4点: 合っている
- 5点: 役に立つ（合っていて、さらに有用である）
調整:
- 不自然な日本語が含まれる場合は 1 点減点する
- 部分的に事実と異なる内容を述べている場合は 1 点減点する
- 過度に慎重で回答を拒否している場合は 2 点とする
- 日本語以外で回答している場合は減点する
- 「この問題の採点基準」がある場合はそれに従う。上記の基準より優先し、点数の上限や上書きを含む
- 最終的な点数は 1〜5 の範囲に収める"""

TEMPLATE = """次の問題に対するアシスタントの回答を採点してください。

# 問題
{question}

# 正解例
{reference}

# この問題の採点基準
{aspect}

# アシスタントの回答
{answer}

# 採点方法
{rubric}

理由を簡潔に述べてから点数を決め、次の形式の JSON オブジェクト1つだけを出力してください（<…> は書き換える）。
{{"reason": "<採点の理由>", "grade": <1〜5の整数>}}"""
# The format line holds no digit after "grade", so a judge that merely echoes it yields no grade, not a 1.

def verdict_schema(reason_max_chars: int) -> dict:
    """The verdict as `response_format` (not strict: OpenAI's strict mode rejects maxLength; servers that enforce
    schemas, vLLM and `ezo serve`, honour it anyway)."""
    schema = {"type": "object", "additionalProperties": False, "required": ["reason", "grade"],
              "properties": {"reason": {"type": "string", "maxLength": reason_max_chars},
                             "grade": {"type": "integer", "enum": [1, 2, 3, 4, 5]}}}
    return {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": False}}


REASK = ("出力を読み取れませんでした（{problem}）。"
         '{{"reason": "<採点の理由>", "grade": <1〜5の整数>}} の形式の JSON オブジェクト1つだけを出力してください。')


def judge_messages(task: OpenTask, answer: str) -> list[dict[str, str]]:
    user = TEMPLATE.format(question=task.prompt, reference=task.reference or "（なし）",
                           aspect=task.aspect or "（なし。上記の採点方法だけで採点する）", answer=answer, rubric=RUBRIC)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


# ---------------------------------------------------------------- parsing

@dataclass(frozen=True)
class Verdict:
    grade: int | float | None  # on the protocol's scale
    reason: str
    error: str | None = None


_GRADE_KEYS = ("grade", "score", "rating", "評価", "点数", "得点", "スコア")
_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_BRACKETED = re.compile(rf"\[\[\s*({_NUMBER})\s*\]\]")
_LABELLED = re.compile(rf"[\"']?(?:{'|'.join(_GRADE_KEYS)})[\"']?\s*[:：=]\s*[\"']?({_NUMBER})", re.I)
_LONE = re.compile(rf"^({_NUMBER})\s*点?\s*[。.]?$")
_GRADE_STRING = re.compile(rf"^({_NUMBER})\s*点?$")


def _grade(value: object) -> tuple[int | None, str | None]:
    """A JSON grade value -> (grade, None) or (None, why it is not one)."""
    if isinstance(value, str):
        m = _GRADE_STRING.match(unicodedata.normalize("NFKC", value).strip())
        if not m:
            return None, f"grade {value!r} is not a number"
        value = float(m.group(1))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"grade {value!r} is not a number"
    if value != int(value):
        return None, f"grade {value} is not a whole number"
    if not 1 <= value <= 5:
        return None, f"grade {int(value)} is outside 1-5"
    return int(value), None


def json_objects(text: str) -> list[dict]:
    """Every JSON object in the text, wherever it starts (prose, code fences, nested)."""
    decoder, found = json.JSONDecoder(), []
    for i, ch in enumerate(text):
        if ch == "{":
            try:
                obj, _ = decoder.raw_decode(text, i)
            except ValueError:
                continue
            if isinstance(obj, dict):
                found.append(obj)
    return found


def _one(values: list[str], what: str) -> Verdict | None:
    """The verdict from regex matches: none -> None; disagreeing ones -> failure."""
    if not values:
        return None
    grades = {_grade(v) for v in values}
    if len(grades) > 1:
        return Verdict(None, "", f"conflicting {what} grades {sorted(set(values))}")
    grade, error = grades.pop()
    return Verdict(grade, "", error)


_REASON = re.compile(r'"(?:reason|理由)"\s*:\s*"((?:[^"\\]|\\.)*)')


def _cut_json_reason(text: str) -> str:
    """The reason from a JSON verdict cut short (no closing brace), else the text: a reader never sees raw JSON."""
    found = _REASON.search(text)
    if not found:
        return text
    try:
        return json.loads(f'"{found.group(1)}"')
    except ValueError:
        return found.group(1)


def parse_verdict(raw: str) -> Verdict:
    text = raw.strip()
    if not text:
        return Verdict(None, "", "empty judge output")
    graded = []
    for obj in json_objects(text):
        key = next((k for k in obj if isinstance(k, str) and k.lower() in _GRADE_KEYS), None)
        if key is not None:
            graded.append((obj[key], obj.get("reason", obj.get("理由", ""))))
    if graded:
        verdicts = {_grade(value) for value, _ in graded}
        if len(verdicts) > 1:
            return Verdict(None, "", f"conflicting grades in {len(graded)} JSON objects")
        grade, error = verdicts.pop()
        reason = graded[0][1]
        return Verdict(grade, "" if reason is None else str(reason).strip(), error)
    plain = unicodedata.normalize("NFKC", text)
    for verdict in (_one(_BRACKETED.findall(plain), "[[n]]"), _one(_LABELLED.findall(plain), "labelled")):
        if verdict is not None:
            return Verdict(verdict.grade, _cut_json_reason(text), verdict.error)
    lone = _LONE.match(plain)
    if lone:
        grade, error = _grade(lone.group(1))
        return Verdict(grade, "", error)
    return Verdict(None, "", "no grade found")


# ---------------------------------------------------------------- one task

def judge_answer(ask: Callable[[list[dict[str, str]]], str], task: OpenTask, answer: str, reasks: int) -> Verdict:
    """`ask` sends messages and returns the judge's text (or raises RemoteError).

    An unusable verdict is followed by at most `reasks` follow-ups naming the problem; the conversation keeps
    the judge's own earlier reply, so a deterministic judge sees a different request each time."""
    if not answer.strip():
        return Verdict(1, EMPTY_ANSWER_REASON)
    return converse(ask, judge_messages(task, answer), reasks, parse_verdict, REASK)


def converse(ask: Callable[[list[dict[str, str]]], str], messages: list[dict[str, str]], reasks: int,
             parse: Callable[[str], Verdict], reask: str) -> Verdict:
    """Ask, parse, and re-ask (`reask` formatted with the problem) until a grade or `reasks` follow-ups."""
    for _ in range(reasks + 1):
        raw = ask(messages)
        verdict = parse(raw)
        if verdict.grade is not None:
            return verdict
        messages = messages + [{"role": "assistant", "content": raw},
                               {"role": "user", "content": reask.format(problem=verdict.error)}]
    return Verdict(None, raw.strip()[:500], f"unusable verdict after {reasks + 1} requests: {verdict.error}")
