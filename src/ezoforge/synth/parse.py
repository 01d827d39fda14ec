"""Turn raw model output into (instruction, response) pairs, and decide which pairs are good enough to train on.

Parsers return the pairs they found plus a (reason, raw piece) for everything they had to drop, so a
rejected output can always be inspected next to the reason.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from difflib import SequenceMatcher

from ezoforge import ja
from ezoforge.synth.prompts import ANSWER_MARK, EXAMPLE_TERMS, QUESTION_MARK
from ezoforge.synth.settings import PairFilters
from ezoforge.text import codepoints, japanese_ratio, repeat_coverage


@dataclass
class Parsed:
    pairs: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (reason, raw piece)


# ---------------------------------------------------------------- synthesizer mode

def parse_synthesizer(text: str) -> Parsed:
    """Instruction Pre-Training's rules: `<QUE> q <ANS> a </END>` pieces; the unterminated tail is dropped."""
    out = Parsed()
    *complete, tail = text.split("</END>")
    if tail.strip():
        out.dropped.append(("unterminated", tail.strip()))
    seen: set[str] = set()
    for raw in complete:
        piece = raw.strip()
        if not piece:
            continue
        if piece.count("<ANS>") != 1:
            out.dropped.append(("ans_count", piece))
            continue
        question, answer = (s.strip() for s in piece.split("<ANS>"))
        if not question.startswith("<QUE>"):
            out.dropped.append(("no_que", piece))
            continue
        question = question.replace("<QUE>", "").strip()
        if not answer:
            out.dropped.append(("empty_answer", piece))
            continue
        if question.lower() in seen:
            out.dropped.append(("repeated_question", piece))
            continue
        seen.add(question.lower())
        out.pairs.append((question, answer))
    return out


# ---------------------------------------------------------------- prompted mode

# A marker is our own (`質問1:`) or a near miss a small model writes instead: another Japanese word, no number,
# a full-width digit or colon, markdown bold or a list bullet around it. Latin Q/A count only at a line start.
_NUM = r"[0-9０-９]{0,3}"
_SEP = r"\s*(?:\*\*)?\s*[:：.．)）]\s*(?:\*\*)?"
_LEAD = r"(?:[-*・#>]+\s*)?(?:\*\*)?\s*"
_MARKER = re.compile(
    rf"(?:^|(?<=[\s。．！？!?」）)]))[ \t]*{_LEAD}(?:(?P<q>{QUESTION_MARK}|問題|問い|指示)|(?P<a>{ANSWER_MARK}|答え|解答|応答))"
    rf"\s*{_NUM}{_SEP}"
    rf"|(?:^|(?<=\n))[ \t]*{_LEAD}(?:(?P<lq>Q(?:uestion)?)|(?P<la>A(?:nswer)?))\s*{_NUM}{_SEP}"
)


# A blank line or a `文章:` label ends a block: what follows is the model starting something else (a new passage).
_BLOCK_END = re.compile(r"\n\s*\n|文章\s*[0-9０-９]*\s*[:：]")
_ENUMERATION = re.compile(r"^[0-9０-９]{1,2}\s*[.．)）]\s*")


def _body(text: str) -> str:
    body = _BLOCK_END.split(text.strip(), maxsplit=1)[0].replace("**", "")
    return _ENUMERATION.sub("", re.sub(r"\s+", " ", body).strip())


def _last_sentence_end(text: str) -> int:
    return max(text.rfind(ch) for ch in ja.SENTENCE_ENDS) + 1


def parse_prompted(text: str, n: int, truncated: bool = False) -> Parsed:
    """Pairs from `質問k: …` / `回答k: …` blocks, at most `n`. With `truncated` (the model hit its token limit)
    the last answer is cut back to its last full sentence, or dropped when it has none."""
    out = Parsed()
    marks = list(_MARKER.finditer(text))
    if not marks:
        out.dropped.append(("no_markers", text.strip()))
        return out
    blocks = []  # (is_question, raw body)
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        blocks.append((bool(m.group("q") or m.group("lq")), text[m.end(): end]))
    cut_last = truncated and not blocks[-1][0]
    if cut_last:
        blocks[-1] = (False, blocks[-1][1][: _last_sentence_end(blocks[-1][1])])
    question = None
    for i, (is_question, raw) in enumerate(blocks):
        body = _body(raw)
        if is_question:
            if question is not None:
                out.dropped.append(("no_answer", question))
            question = body
        elif question is None:
            out.dropped.append(("answer_without_question", body))
        elif not body:
            out.dropped.append(("truncated" if cut_last and i == len(blocks) - 1 else "empty_answer", question))
            question = None
        else:
            out.pairs.append((question, body))
            question = None
    if question is not None:
        out.dropped.append(("no_answer", question))
    out.pairs = out.pairs[:n]
    return out


# ---------------------------------------------------------------- pair filters

def norm(text: str) -> str:
    """Comparison key: NFKC, case-folded, without spaces or punctuation."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if not (ch.isspace() or unicodedata.category(ch).startswith("P")))


def copies(text: str, passage: str, fraction: float) -> bool:
    """True when `text` holds a verbatim run covering `fraction` of the passage."""
    if not passage or len(text) < fraction * len(passage):
        return False
    match = SequenceMatcher(None, text, passage, autojunk=False).find_longest_match()
    return match.size >= fraction * len(passage)


def repeated_fraction(text: str, n: int = 10) -> float:
    """Share of characters (whitespace aside) in second and later copies of a repeated n-character run: a small
    model stuck in a loop writes the same clause again and again."""
    codes = codepoints(re.sub(r"\s+", "", text))
    return repeat_coverage(codes, [n])[n] / len(codes) if len(codes) else 0.0


class PairFilter:
    """Decides whether one pair is kept; remembers one document's instructions to drop repeats, so call
    `new_document` between documents."""

    def __init__(self, limits: PairFilters):
        self.limits = limits
        self.seen: set[str] = set()

    def new_document(self) -> None:
        self.seen = set()

    def check(self, instruction: str, response: str, passage: str) -> str | None:
        """None when the pair is kept, else the reason it is not."""
        lim = self.limits
        if not instruction.strip() or not response.strip():
            return "empty"
        if not lim.min_instruction_chars <= len(instruction) <= lim.max_instruction_chars:
            return "instruction_length"
        if not lim.min_response_chars <= len(response) <= lim.max_response_chars:
            return "response_length"
        if japanese_ratio(instruction) < lim.min_japanese or japanese_ratio(response) < lim.min_japanese:
            return "not_japanese"
        if any(term in instruction + response and term not in passage for term in EXAMPLE_TERMS):
            return "copies_example"
        key = norm(instruction)
        if norm(response) in key:
            return "answer_repeats_question"
        if repeated_fraction(response) > lim.max_repeated_fraction:
            return "repetitive"
        if copies(response, passage, lim.max_copy_fraction) or copies(instruction, passage, lim.max_copy_fraction):
            return "copies_passage"
        if key in self.seen:
            return "duplicate_instruction"
        self.seen.add(key)
        return None
