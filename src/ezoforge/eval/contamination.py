"""Is the test in the training data? Each task's input and reference, looked up by character n-grams in the pairs
the evaluated model was trained on and in the curated documents those pairs were made from.

The training data is found by following DONE markers, the records each stage keeps of what it read: a merged
model's folder → its train folder (an adapter's parent) → the synth folders and pair files it trained on → the
curate folders they were synthesized from. Nothing past curation (the raw corpora) is read.

Why n = 13 characters and a threshold of half a text's n-grams (both settable: eval.contamination_n,
eval.contamination_threshold): GPT-3's decontamination used 13-grams of words. A Japanese character carries about
as much as a short English word, and after normalization (NFKC, no spaces or punctuation) the set phrases two
unrelated Japanese texts share — 「について説明してください」 is 12 characters — stay under 13, while any copied
clause gives several 13-grams. A single shared 13-gram still happens by chance (a proverb, a name with its
title), so one hit does not flag a task; half of its n-grams found means most of its text appears verbatim, which
a planted or lightly edited copy reaches (near 100%) and clean data does not (near 0%).

Speed: the tasks' n-grams (a few thousand) are indexed once in a set, and the training text is streamed once,
each text's n-grams intersected with that set: time linear in the training text, memory in the tasks.
"""
from __future__ import annotations

import logging
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ezoforge.errors import EzoError, RecordError
from ezoforge.eval.items import OpenTask
from ezoforge.records import read_rows
from ezoforge.report_kit import render
from ezoforge.stage import done_info, input_files, lineage

FIELDS = ("input", "reference")
# The stages whose raw input files are training text, and which kind.
RAW_TRAINING_TEXT = {"synth": "documents", "train": "pairs"}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    kind: str  # "pairs" (a synth folder or a pair file train read) or "documents" (a curate folder or document file)
    stage: str  # the stage that wrote it ("synth", "curate"), or "file" for a user's own file
    path: Path


def normalize(text: str) -> str:
    """NFKC, lower case, without spaces, punctuation, symbols and control characters: a copy that differs only in
    full-width digits, line breaks or 「」 still matches."""
    return "".join(c for c in unicodedata.normalize("NFKC", text).lower()
                   if unicodedata.category(c)[0] not in "ZPSC")


def ngrams(text: str, n: int) -> set[str]:
    return {text[i: i + n] for i in range(len(text) - n + 1)}


def training_sources(model: str, adapter: str | Path | None) -> tuple[list[Source], list[str]]:
    """The data behind a model (a merged folder, or a base plus an adapter inside a train folder), found through
    the DONE markers (`stage.lineage`); and the recorded inputs that no longer exist."""
    starts = [Path(adapter), Path(adapter).parent] if adapter is not None else []
    if Path(model).expanduser().is_dir():
        starts.append(Path(model).expanduser())
    sources: list[Source] = []
    missing: list[str] = []
    seen: set[Path] = set()
    for start in starts:
        try:
            chain = lineage(start)
        except RecordError as e:  # another version's folder: no provenance to follow, said as such
            missing.append(f"{start} (its records cannot be read: {e})")
            continue
        for folder, done in chain:
            if folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            if done.stage in ("synth", "curate"):
                sources.append(Source("pairs" if done.stage == "synth" else "documents", done.stage, folder.resolve()))
            # Raw files count where they fed training text: a user's document file (synth), pair file (train).
            # Other stages' raw inputs (curate's corpora, an eval's task files) fed none directly.
            kind = RAW_TRAINING_TEXT.get(done.stage)
            for p in map(Path, done.inputs) if kind else ():
                if not p.exists():
                    missing.append(str(p))
                elif done_info(p) is None:
                    sources.append(Source(kind, "file", p.resolve()))
    return sources, missing


def texts(source: Source) -> Iterator[str]:
    """Every text of a source: a document's text; a pair's instruction, context and response (or its messages)."""
    from ezoforge.train.data import row_messages

    for path in input_files([source.path]):
        for n, row in read_rows(path):
            if source.kind == "documents":
                if isinstance(row.get("text"), str):
                    yield row["text"]
            else:
                yield from (m["content"] for m in row_messages(path, n, row, None))  # a user turn holds its context


def task_texts(task: OpenTask) -> dict[str, list[str]]:
    return {"input": list(task.turns), "reference": [t for t in (task.reference, *task.references) if t]}


def check(tasks: list[OpenTask], sources: list[Source], n: int, threshold: float) -> dict:
    """The share of each task's input and reference n-grams found in the sources; tasks at or over `threshold`
    in either are flagged. Texts shorter than `n` characters (normalized) cannot be checked and are listed."""
    grams: list[tuple[str, str, set[str]]] = []  # (task id, field, its n-grams)
    too_short = []
    for task in tasks:
        for field, parts in task_texts(task).items():
            got = set().union(*(ngrams(normalize(p), n) for p in parts)) if parts else set()
            if got:
                grams.append((task.id, field, got))
            elif parts:
                too_short.append(f"{task.id} ({field})")
    index: dict[str, list[int]] = {}
    for i, (_, _, got) in enumerate(grams):
        for g in got:
            index.setdefault(g, []).append(i)
    found: list[set[str]] = [set() for _ in grams]
    where: list[set[str]] = [set() for _ in grams]
    checked = []
    for source in sources:
        count = 0
        for text in texts(source):
            count += 1
            for g in ngrams(normalize(text), n).intersection(index):
                for i in index[g]:
                    found[i].add(g)
                    where[i].add(source.stage)
        checked.append({"kind": source.kind, "stage": source.stage, "path": str(source.path), "texts": count})
    shares: dict[str, dict[str, float]] = {}
    places: dict[str, set[str]] = {}
    for (task_id, field, got), hit, at in zip(grams, found, where):
        shares.setdefault(task_id, {})[field] = len(hit) / len(got)
        places.setdefault(task_id, set()).update(at)
    flagged = [{"task_id": t.id, **{f"{f}_share": _round(shares.get(t.id, {}).get(f)) for f in FIELDS},
                "found_in": sorted(places.get(t.id, ()))}
               for t in tasks if any(s >= threshold for s in shares.get(t.id, {}).values())]
    return {"n": n, "threshold": threshold, "tasks_checked": len(tasks), "checked_against": checked,
            "flagged": flagged, "too_short": too_short}


def run_check(tasks: list[OpenTask], model: str, adapter: str | Path | None, mode: str, n: int,
              threshold: float) -> dict:
    """The check as `eval.contamination` asks: `off` checks nothing, `fail` raises naming the flagged tasks."""
    if mode == "off" or not tasks:
        return {"mode": mode, "n": n, "threshold": threshold, "tasks_checked": 0, "checked_against": [],
                "flagged": [], "too_short": []}
    sources, missing = training_sources(model, adapter)
    result = {"mode": mode, **check(tasks, sources, n, threshold)}
    if missing:
        result["missing"] = missing
    if mode == "fail" and result["flagged"]:
        raise EzoError(f"eval.contamination is fail and {len(result['flagged'])} task(s) appear in the training "
                       f"data ({n}-character n-grams, threshold {threshold:.0%}): "
                       + ", ".join(f"{f['task_id']} ({_share_words(f)})" for f in result["flagged"])
                       + "; nothing was judged. Remove them from the tasks or the training data, or set "
                       "eval.contamination: warn to list them in the report instead")
    if result["flagged"]:
        log.warning("%s", summary(result))
    return result


def _round(share: float | None) -> float | None:
    return None if share is None else round(share, 4)


def _share_words(flag: dict) -> str:
    return ", ".join(f"{f} {flag[f + '_share']:.0%}" for f in FIELDS if flag.get(f + "_share") is not None)


def summary(result: dict | None) -> str:
    """One sentence for every report."""
    if not result or result.get("mode") == "off":
        return "Contamination check: off (eval.contamination: off)."
    if not result["tasks_checked"]:
        return "Contamination check: no open-ended tasks to check."
    how = f"{result['n']}-character n-grams, flagged at {result['threshold']:.0%} of a text's n-grams"
    if not result["checked_against"]:
        return (f"Contamination check: no training data is recorded for this model (no DONE provenance behind it), "
                f"so its {result['tasks_checked']} tasks were compared with nothing.")
    kinds = sorted({f"{c['stage']} {c['kind']}" for c in result["checked_against"]})
    against = f"{sum(c['texts'] for c in result['checked_against']):,} texts ({', '.join(kinds)})"
    if result.get("missing"):
        against += f"; {len(result['missing'])} recorded input(s) no longer exist and were not checked"
    flagged = result["flagged"]
    if not flagged:
        return f"Contamination check: none of the {result['tasks_checked']} tasks found in {against}; {how}."
    return (f"Contamination check: {len(flagged)} of {result['tasks_checked']} tasks found in {against}; {how}: "
            + ", ".join(f["task_id"] for f in flagged) + ".")


def html_section(result: dict | None) -> str:
    """The sentence and the flagged tasks (templates/contamination.html); nothing when no check ran."""
    flagged = [[f["task_id"], *(_pct(f.get(k + "_share")) for k in FIELDS), ", ".join(f["found_in"])]
               for f in (result or {}).get("flagged") or []]
    return render("contamination.html", result=result, summary=summary(result) if result else None, flagged=flagged)


def markdown_section(result: dict | None) -> list[str]:
    if result is None:
        return []
    out = [summary(result)]
    if result.get("flagged"):
        out.append("\n".join(["| task | input found | reference found | found in |", "|---|---|---|---|"]
                             + [f"| {f['task_id']} | {_pct(f.get('input_share'))} | "
                                f"{_pct(f.get('reference_share'))} | {', '.join(f['found_in'])} |"
                                for f in result["flagged"]]))
    return out


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"
