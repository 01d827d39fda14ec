"""The preference data: instructions drawn from the SFT's own training pairs, graded candidates, (chosen, rejected).

Provenance runs instruction → candidates → verdicts → pair: every candidate and pair names its instruction's id,
its document and the file:line it was read from.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ezoforge.errors import RecordError
from ezoforge.records import read_rows
from ezoforge.stage import input_files
from ezoforge.train.data import row_messages


@dataclass(frozen=True)
class Instruction:
    id: str
    prompt: str  # the user turn as the SFT saw it (the passage, then the instruction, when the pair has one)
    reference: str  # the synthesized response the SFT learned
    doc_id: str | None
    origin: str  # FILE:LINE


def read_instructions(inputs: list[str | Path]) -> tuple[list[Instruction], int]:
    """Single-turn pairs of the SFT's inputs (synth folders or pair files), first occurrence of each prompt;
    and how many rows were skipped (multi-turn conversations, repeated prompts)."""
    out, seen, skipped = [], set(), 0
    for path in input_files(list(inputs)):
        for n, row in read_rows(path):
            turns = [m for m in row_messages(path, n, row, None) if m["role"] != "system"]
            if [m["role"] for m in turns] != ["user", "assistant"] or turns[0]["content"] in seen:
                skipped += 1
                continue
            seen.add(turns[0]["content"])
            out.append(Instruction(str(row.get("id") or f"{Path(path).name}:{n}"), turns[0]["content"],
                                   turns[1]["content"], row.get("doc_id"), f"{path}:{n}"))
    if not out:
        raise RecordError(f"{', '.join(map(str, inputs))}: no single-turn instruction/response pair to draw from")
    return out, skipped


def draw(items: list[Instruction], limit: int | None, seed: int) -> list[Instruction]:
    """A seeded random order, cut at `limit`: the first N of a larger limit are the N of a smaller one."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[:limit]]


def best_and_worst(candidates: list[dict]) -> tuple[dict, dict] | None:
    """The highest- and lowest-graded candidates (the first of equals, in candidate order), or None when fewer
    than two were graded."""
    graded = [c for c in candidates if c["grade"] is not None]
    if len(graded) < 2:
        return None
    best = max(graded, key=lambda c: c["grade"])  # max/min keep the first of equal grades
    worst = min(graded, key=lambda c: c["grade"])
    return best, worst


def build_pairs(instructions: list[Instruction], candidates: dict[str, list[dict]], messages: dict[str, list],
                min_margin: float) -> tuple[list[dict], Counter]:
    """One (chosen, rejected) pair per instruction whose best and worst grades differ by at least `min_margin`;
    and the margin of every instruction with two graded candidates (the histogram)."""
    pairs, margins = [], Counter()
    for ins in instructions:
        found = best_and_worst(candidates[ins.id])
        if found is None:
            continue
        best, worst = found
        margin = round(best["grade"] - worst["grade"], 4)
        margins[margin] += 1
        if margin < min_margin or best["text"] == worst["text"]:
            continue
        pairs.append({"id": ins.id, "doc_id": ins.doc_id, "origin": ins.origin, "instruction": ins.prompt,
                      "prompt": messages[ins.id], "chosen": best["text"], "rejected": worst["text"],
                      "chosen_grade": best["grade"], "rejected_grade": worst["grade"], "margin": margin,
                      "chosen_candidate": best["candidate"], "rejected_candidate": worst["candidate"],
                      "chosen_source": best["source"], "rejected_source": worst["source"]})
    return pairs, margins


def histogram(counts: Counter) -> dict[str, int]:
    """{margin: instructions}, in order, with JSON-friendly keys ("2" for a whole margin)."""
    return {f"{m:g}": counts[m] for m in sorted(counts)}
