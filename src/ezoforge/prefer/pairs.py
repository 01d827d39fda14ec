"""The preference data: instructions drawn from the SFT's own training pairs, graded candidates, (chosen, rejected).

Provenance runs instruction → candidates → verdicts → pair: every candidate and pair names its instruction's id,
its document and the file:line it was read from.
"""
from __future__ import annotations

from collections import Counter

from ezoforge.train.continued import Instruction


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
