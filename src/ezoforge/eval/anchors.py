"""Published scores (data/anchors.csv) placed beside a run: only those graded by the same judge version.

A grade means something only next to grades from the same judge: judges grade differently (shaberi's README says
scores under different judges are not comparable), so a run is shown only with figures whose judge is the version
that answered this run (its `model` string as served, the dated OpenAI version; the configured name when no reply
reported one). The judge's prompt matters as much: a run is ranked only among figures graded with the same prompt set
(the benchmark's judge prompt version, ours or a harness's); figures under the same judge but another prompt set are
shown as context, labelled so, and not ranked. A figure on another scale is converted only when the two scales are affine images of each
other (the same number of equal grade steps, e.g. 1–10 and 0.1–1.0); otherwise it is shown as published and not
ranked. A local judge (the bundled 135M model above all) graded no published figure, and every report says so.
"""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

from ezoforge.errors import RecordError
from ezoforge.eval.task_types.judged import JudgedTask
from ezoforge.eval.tasks import TASK_TYPES
from ezoforge.report_kit import Cell, render

ANCHORS = Path(__file__).resolve().parent.parent / "data" / "anchors.csv"
FIELDS = ("model", "benchmark", "score", "scale", "judge", "prompt_set", "protocol", "source", "date", "note")
_JUDGED = [t for t in TASK_TYPES.values() if isinstance(t, JudgedTask)]
# The scale our judge prompts grade each open benchmark on (ELYZA's rubric 1–5, MT-Bench's single-answer 1–10).
RUN_SCALES = {t.kind: f"{t.scale[0]}-{t.scale[1]}" for t in _JUDGED}
# The prompt set each open benchmark's answers are graded with here (the task type's judge prompt version).
RUN_PROMPT_SETS = {t.kind: t.prompt_version for t in _JUDGED}
NONE_UNDER_JUDGE = "no published figure under this judge"


@dataclass(frozen=True)
class Anchor:
    model: str
    benchmark: str
    score: float
    scale: str
    judge: str
    prompt_set: str  # the judge prompt the figure was graded with: a harness and version, or ours
    protocol: str
    source: str
    date: str
    note: str = ""


def parse_scale(scale: str) -> tuple[float, float, float]:
    """"1-5" → (1, 5, 1); "0.1-1.0" → (0.1, 1.0, 0.1): the lowest and highest grade and the step between grades
    (a whole-grade rubric's step is the lowest grade's own unit)."""
    lo, sep, hi = scale.partition("-")
    try:
        low, high = float(lo), float(hi)
    except ValueError:
        raise ValueError(f"scale {scale!r}: expected LOW-HIGH, e.g. 1-5") from None
    if not sep or high <= low:
        raise ValueError(f"scale {scale!r}: expected LOW-HIGH with LOW < HIGH")
    decimals = len(lo.partition(".")[2])
    return low, high, 10.0 ** -decimals if decimals else 1.0


def convert(score: float, source: str, target: str) -> float | None:
    """`score` from scale `source` onto `target` when the two are affine images of each other (the same number of
    grade steps, as 1–10 and 0.1–1.0); else None: a 1–5 and a 1–10 rubric are different judgements, not units."""
    if source == target:
        return score
    (a, b, s), (c, d, t) = parse_scale(source), parse_scale(target)
    if round((b - a) / s) != round((d - c) / t):
        return None
    return c + (score - a) * (d - c) / (b - a)


def load(path: Path = ANCHORS) -> list[Anchor]:
    """Every row of the anchors file; a bad row names FILE:LINE and the field."""
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != FIELDS:
            raise RecordError(f"{path}:1: header must be {','.join(FIELDS)}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            for field in FIELDS[:-1]:
                if not (row.get(field) or "").strip():
                    raise RecordError(f"{where}: missing field '{field}'")
            try:
                score = float(row["score"])
                parse_scale(row["scale"])
            except ValueError as e:
                raise RecordError(f"{where}: field 'score' or 'scale': {e}") from None
            out.append(Anchor(**{**row, "score": score}))
    return out


def is_local(judge: dict | None) -> bool:
    """A judge we served ourselves (`judge_url: local`, or a bundled model): it graded no published figure."""
    return bool(judge) and (judge.get("url") == "local" or str(judge.get("model", "")).startswith("bundled:"))


def identity(judge: dict) -> tuple[str | None, str]:
    """The judge version to match, and where it came from: the single `model` string its replies reported, else
    the configured name; None when the replies reported several versions."""
    served = judge.get("served") or []
    if isinstance(served, str):
        served = [served]
    if len(served) > 1:
        return None, "served"
    return (served[0], "served") if served else (judge.get("model"), "configured")


def place(benchmark: str, judge: dict | None, score: float | None, anchors: list[Anchor] | None = None,
          protocol: str = "this run") -> dict:
    """The published figures to show beside a run's `score` on `benchmark` (its scale: RUN_SCALES), and the
    sentence that says what they are. `judge`: the eval report's judge ({model, url, served, …}) or None."""
    scale = RUN_SCALES[benchmark]
    base = {"benchmark": benchmark, "scale": scale, "score": score, "protocol": protocol, "judge": None,
            "judge_from": None, "rows": []}
    if not judge:
        return {**base, "comparable": False, "statement": "Not judged: no grade to place beside published figures."}
    if is_local(judge):
        return {**base, "judge": judge.get("model"), "comparable": False,
                "statement": f"Graded by {judge.get('model')}, a judge served locally: its grades are comparable to "
                             "no published figure (they test the plumbing, not the model)."}
    version, source = identity(judge)
    if version is None:
        return {**base, "comparable": False,
                "statement": f"The judge answered as several versions ({', '.join(judge['served'])}): "
                             f"{NONE_UNDER_JUDGE}."}
    matching = [a for a in (load() if anchors is None else anchors) if a.benchmark == benchmark and a.judge == version]
    prompt_set = RUN_PROMPT_SETS[benchmark]
    rows = []
    for a in matching:
        context = a.prompt_set != prompt_set
        shown = None if context else convert(a.score, a.scale, scale)
        rows.append({**asdict(a), "shown": None if shown is None else round(shown, 2), "context": context})
    # Figures on this run's scale and prompt set are ranked with it; the rest stay as published, below them.
    rows.sort(key=lambda r: (r["context"], r["shown"] is None,
                             -(r["shown"] if r["shown"] is not None else r["score"]), r["model"]))
    which = "as served" if source == "served" else "as configured (no reply reported a version)"
    ranked_rows = [r for r in rows if not r["context"]]
    context_sets = sorted({r["prompt_set"] for r in rows if r["context"]})
    if not rows:
        statement = f"There is {NONE_UNDER_JUDGE} ({version}, {which})."
    elif not ranked_rows:
        statement = (f"Published figures graded by the same judge version, {version} ({which}), but with other judge "
                     f"prompts ({', '.join(context_sets)}) than this run's ({prompt_set}): shown as context, not "
                     "ranked with this run.")
    else:
        converted = {r["scale"] for r in ranked_rows if r["shown"] is not None and r["scale"] != scale}
        unranked = sum(r["shown"] is None for r in ranked_rows)
        statement = (f"Published figures graded by the same judge version, {version} ({which}), and the same judge "
                     f"prompts ({prompt_set}), on the {scale} scale; protocols differ (see each row)."
                     + (f" Converted from {', '.join(sorted(converted))} (an affine change of unit)." if converted
                        else "")
                     + (f" {unranked} on another scale, shown as published and not ranked." if unranked else "")
                     + (f" Figures with other judge prompts ({', '.join(context_sets)}) are shown as context, not "
                        "ranked." if context_sets else ""))
    return {**base, "judge": version, "judge_from": source, "prompt_set": prompt_set, "comparable": bool(ranked_rows),
            "statement": statement, "rows": rows}


def for_report(report: dict, judge: dict | None, anchors: list[Anchor] | None = None) -> list[dict]:
    """A placement per open benchmark of an eval report (its mean grade there, on that benchmark's scale)."""
    kinds = [k for k in RUN_SCALES if any(t.split(":", 1)[0] == k for t in report.get("tasks") or [])]
    p = report.get("protocol") or {}
    protocol = f"{p.get('samples', 1)} x {p.get('judgments', 1)} (samples x judgments), this run"
    return [place(k, judge, ((report.get("by_suite") or {}).get(k) or report).get("mean_grade"), anchors, protocol)
            for k in kinds]


# ---------------------------------------------------------------- rendering

BENCHMARK_NAMES = {t.kind: t.benchmark for t in _JUDGED}


Run = tuple[str, float | None, str]  # (label, score on the benchmark's scale, protocol)


def beside(evals: list[tuple[str, list[dict]]]) -> list[tuple[dict, list[Run]]]:
    """The placements of one or more evals (label, placements), grouped where benchmark, judge and statement are
    the same: the runs of a group are ranked in one table, runs under different judges never are."""
    groups: dict[tuple, tuple[dict, list[Run]]] = {}
    for label, placements in evals:
        for p in placements:
            key = (p["benchmark"], p["judge"], p["statement"])
            groups.setdefault(key, (p, []))[1].append((label, p["score"], p["protocol"]))
    return list(groups.values())


def ranked(placement: dict, runs: list[Run]) -> list[dict]:
    """The placement's rows with each run (label, score on the run's scale, protocol) put in rank; runs without a
    score and figures on another scale or prompt set come last, unranked."""
    table = [{"label": r["model"], "shown": r["shown"], "row": r} for r in placement["rows"]]
    table += [{"label": label, "shown": score, "row": None, "protocol": protocol} for label, score, protocol in runs]
    table.sort(key=lambda x: (x["shown"] is None, -(x["shown"] or 0.0), x["row"] is not None))
    return table


def _cells(item: dict, scale: str) -> tuple[str, str, str, str, str]:
    r = item["row"]
    score = "–" if item["shown"] is None else f"{item['shown']:.2f}"
    if r is None:
        return score, scale, item["protocol"], "", ""
    if r.get("context"):
        score = f"{r['score']:.2f} (context: {r['prompt_set']} prompts, not ranked)"
    elif r["shown"] is None:
        score = f"{r['score']:.2f} (on {r['scale']}, not ranked)"
    elif r["scale"] != scale:
        score += f" (published {r['score']:g} on {r['scale']})"
    return score, r["scale"], r["protocol"], r["date"], r["source"]


def html_section(groups: list[tuple[dict, list[Run]]]) -> str:
    """A sentence and a table per group of `beside` (templates/anchors.html)."""
    benchmarks = []
    for p, runs in groups:
        rows = []
        for item in ranked(p, runs) if p["rows"] else []:
            score, scale, protocol, date, source = _cells(item, p["scale"])
            label = Cell(item["label"], bold=item["row"] is None)  # the runs in bold
            rows.append([label, score, scale, protocol, date, Cell("source", href=source) if source else ""])
        benchmarks.append({"name": BENCHMARK_NAMES[p["benchmark"]], "statement": p["statement"], "rows": rows})
    return render("anchors.html", benchmarks=benchmarks)


def markdown_section(groups: list[tuple[dict, list[Run]]]) -> list[str]:
    """The same as Markdown paragraphs (the model card)."""
    out = []
    for p, runs in groups:
        out.append(f"{BENCHMARK_NAMES[p['benchmark']]}: {p['statement']}")
        if not p["rows"]:
            continue
        lines = ["| model | score | scale | protocol | date | source |", "|---|---|---|---|---|---|"]
        for item in ranked(p, runs):
            score, scale, protocol, date, source = _cells(item, p["scale"])
            label = f"**{item['label']}**" if item["row"] is None else item["label"]
            lines.append(f"| {label} | {score} | {scale} | {protocol} | {date} | "
                         + (f"[source]({source})" if source else "") + " |")
        out.append("\n".join(lines))
    return out
