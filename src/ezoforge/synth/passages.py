"""Documents in, passages out: read a curate output (or JSONL/Parquet with `text`), split long texts on Japanese
sentence boundaries into passages that fit the token budget."""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ezoforge import ja
from ezoforge.errors import RecordError
from ezoforge.records import read_rows, require

# A sentence ends at a sentence-ending mark (with any closing brackets after it) or at a line break.
_ENDS = re.escape(ja.SENTENCE_ENDS)
_SENTENCE = re.compile(rf"[^{_ENDS}\n]*(?:[{_ENDS}]+[{re.escape(ja.CLOSING_BRACKETS)}]*|\n+|$)")

# Tokens kept free beyond prompt + passage + new tokens: sentence-wise counts can differ slightly from the whole.
MARGIN = 16


def passage_budget(max_passage_tokens: int, context: int, prompt_tokens: int, max_new_tokens: int) -> int:
    """The tokens a passage may take: synth.max_passage_tokens, at most what the context leaves beside the prompt,
    the answer and a margin. synth splits documents by it; `ezo plan` counts their passages by it."""
    return min(max_passage_tokens, context - prompt_tokens - max_new_tokens - MARGIN)


@dataclass
class Doc:
    id: str
    text: str
    source: str  # as curate writes it (wikipedia, fineweb, ...); a file without the column: the file's name stem


def read_docs(files: list[Path]) -> Iterator[Doc]:
    """Documents in file order; a row without `id` is named FILE:LINE. Empty texts are skipped."""
    seen: dict[str, str] = {}
    for path in files:
        stem = path.name.split(".")[0]
        for lineno, row in read_rows(path):
            text = require(path, lineno, row, "text")
            raw_id = row.get("id")
            doc_id = f"{path.name}:{lineno}" if raw_id is None else str(raw_id)
            if doc_id in seen:
                raise RecordError(f"{path}:{lineno}: duplicate id {doc_id!r} (first at {seen[doc_id]})")
            seen[doc_id] = f"{path}:{lineno}"
            if text.strip():
                yield Doc(doc_id, text.strip(), str(row.get("source") or stem))


def sentences(text: str) -> list[str]:
    """Sentences with their trailing line breaks, so joining them gives the text back."""
    out: list[str] = []
    for piece in _SENTENCE.findall(text):
        if piece.strip() or not out:
            out.append(piece)
        else:
            out[-1] += piece
    return [s for s in out if s.strip()]


def split(text: str, budget: int, count: Callable[[str], int]) -> list[str]:
    """Consecutive sentences packed into passages of at most `budget` tokens; a single longer sentence is cut
    into pieces that fit."""
    passages: list[str] = []
    current, used = "", 0
    for sentence in sentences(text):
        n = count(sentence)
        if n > budget:
            if current.strip():
                passages.append(current.strip())
            current, used = "", 0
            passages += _cut(sentence, budget, count)
            continue
        if used + n > budget and current.strip():
            passages.append(current.strip())
            current, used = "", 0
        current += sentence
        used += n
    if current.strip():
        passages.append(current.strip())
    return passages


def _cut(sentence: str, budget: int, count: Callable[[str], int]) -> list[str]:
    pieces = []
    rest = sentence
    while rest.strip():
        size = len(rest)
        while size > 1 and count(rest[:size]) > budget:
            size = max(1, size * budget // count(rest[:size]) - 1)
        pieces.append(rest[:size].strip())
        rest = rest[size:]
    return [p for p in pieces if p]
