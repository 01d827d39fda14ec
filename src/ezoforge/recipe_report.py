"""The top-level report of `ezo run`: every number read from the stage outputs, never typed in.

report.json holds the figures; report.html reads like a results page: what each stage did, base vs tuned with the
difference and its interval, the data mix, where synthesized pairs came from, and the two models' answers side by side.
"""
from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from ezoforge.config import imported
from ezoforge.eval.compare import paired_diff
from ezoforge.eval.eval_report import pairwise_words
from ezoforge.eval.tasks import METRICS, SUMMARY_KEYS
from ezoforge.records import read_eval_report, read_jsonl, read_judgements, write_json, write_text
from ezoforge.report_kit import Cell, counts, fmt, pct, rate, render, size_or_dash
from ezoforge.stages import STEPS

N_EXAMPLES = 3  # synthesized pairs shown with their provenance
N_ANSWERS = 20  # eval tasks shown side by side (largest grade changes first); each eval's own report has them all


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _jsonl(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl(path)] if path.exists() else []


def _shards(folder: Path) -> list[Path]:
    return sorted((folder / "data").glob("*.parquet"))


def _pairs(folder: Path) -> list[dict]:
    """Synth's pairs (source only where synth recorded it), in shard order."""
    cols = ("id", "doc_id", "source", "context", "instruction", "response")
    return [row for path in _shards(folder) for row in pq.read_table(
        path, columns=[c for c in cols if c in pq.read_schema(path).names]).to_pylist()]


def _curated(folder: Path) -> Counter:
    """Curated documents per source, counted in Arrow (a real run keeps millions)."""
    n: Counter = Counter()
    for path in _shards(folder):
        n.update({v["values"]: v["counts"] for v in pc.value_counts(pq.read_table(path, columns=["source"])
                                                                     .column("source")).to_pylist()})
    return n


def _documents(folder: Path, ids: set[str]) -> dict[str, dict]:
    """Source, title and URL of the curated documents with these ids."""
    out: dict[str, dict] = {}
    for path in _shards(folder) if ids else []:
        found = pq.read_table(path, columns=["id", "source", "title", "url"], filters=[("id", "in", sorted(ids))])
        out.update((d["id"], d) for d in found.to_pylist())
    return out


# ---------------------------------------------------------------- words for figures

def hms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _stage_words(step: str, folder: Path) -> str:
    """A finished step's sentence, as its stage says it (`stages.Step.summary`, the stage's CLI prints the same)."""
    return imported(STEPS[step].summary)(folder)


# ---------------------------------------------------------------- collecting

def _eval_summary(folder: Path) -> dict:
    """An eval folder's headline figures (none where the run had no such eval)."""
    path = folder / "report.json"
    rep = read_eval_report(path) if path.exists() else {}
    keys = ("status", "n_tasks", "n_scored", "n_failed", *SUMMARY_KEYS, "model", "judge", "partial", "anchors",
            "contamination", "scale")
    return {k: rep.get(k) for k in keys if k in rep}


def _grade_diff(workdir: Path, before: str = STEPS["eval-base"].folder) -> tuple[dict | None, list[str]]:
    """Tuned minus `before` (base, or the SFT model) mean grade over the tasks graded in both, with its paired
    bootstrap interval, and compare's notes."""
    tuned = STEPS["eval-tuned"].folder
    if not all((workdir / f / "report.json").exists() for f in (before, tuned)):
        return None, []
    return paired_diff(workdir / before, workdir / tuned)


def _versus(base: dict, tuned: dict, grade_diff: dict | None) -> list[dict]:
    rows = []
    for key, metric in METRICS.items():
        b, t, higher = base.get(key), tuned.get(key), metric.higher_is_better
        if b is None and t is None:
            continue
        row = {"metric": key, "label": metric.label, "base": b, "tuned": t, "higher_is_better": higher,
               "difference": None, "ci95": None, "n_paired": None, "better": None}
        if b is not None and t is not None:
            row["difference"] = round(t - b, 4)
            same = metric.shown(t) == metric.shown(b)  # equal as printed: neither is marked
            row["better"] = None if same else "tuned" if (t > b) == higher else "base"
        if key == "mean_grade" and grade_diff is not None:  # paired over the tasks graded in both runs
            d = grade_diff["diff"]
            tie = metric.shown(d, signed=True) in ("+0.00", "-0.00")
            row.update(difference=d, ci95=grade_diff["ci95"], n_paired=grade_diff["n"],
                       better=None if tie else "tuned" if d > 0 else "base")
        if key == "perplexity" and row["difference"] is not None:
            row["change_pct"] = round(100 * (t / b - 1), 2)
        rows.append(row)
    return rows


def _data_mix(curated: Counter, pairs: list[dict], synth: dict, train: dict) -> list[dict]:
    """Per source: documents curated; drawn, passages, documents with pairs and pairs from synth's stats (or, for
    folders written before synth kept them, counted from its pairs); pairs trained from train's stats."""
    by_source = synth.get("by_source")
    if by_source is None and pairs and all(p["source"] for p in pairs):
        with_pairs = Counter(source for _, source in {(p["doc_id"], p["source"]) for p in pairs})
        pair_counts = Counter(p["source"] for p in pairs)
        by_source = {s: {"pairs": pair_counts.get(s, 0), "documents_with_pairs": with_pairs.get(s, 0)}
                     for s in set(curated) | set(pair_counts)}
    by_source = by_source or {}
    trained = train.get("pairs_by_source") or {}
    if not by_source and not trained:
        return []
    rows = []
    for s in sorted(set(curated) | set(by_source) | set(trained)):
        got = by_source.get(s, {})
        rows.append({"source": s, "documents": curated.get(s), "documents_drawn": got.get("documents"),
                     "passages": got.get("passages"), "documents_with_pairs": got.get("documents_with_pairs"),
                     "pairs": got.get("pairs"), "pairs_trained": trained.get(s)})
    return rows


def _examples(pairs: list[dict], docs: dict[str, dict]) -> list[dict]:
    """A few pairs with the document and passage they came from, taking sources in turn."""
    queues: dict[str | None, list[dict]] = {}
    for p in pairs:
        queues.setdefault(p["source"], []).append(p)
    picked: list[dict] = []
    while len(picked) < N_EXAMPLES and any(queues.values()):
        picked += [q.pop(0) for q in queues.values() if q][: N_EXAMPLES - len(picked)]
    return [{"pair_id": p.get("id"), "doc_id": p["doc_id"], "source": p["source"],
             "title": docs.get(p["doc_id"], {}).get("title"), "url": docs.get(p["doc_id"], {}).get("url"),
             "passage": p.get("context"), "instruction": p["instruction"], "response": p["response"]} for p in picked]


def _side_by_side(workdir: Path) -> list[dict]:
    """Each eval task with both answers and verdicts, the largest grade change (then chrF change) first."""
    sides = {}
    for side in ("base", "tuned"):
        folder = workdir / STEPS[f"eval-{side}"].folder
        sides[side] = ({r["task_id"]: r for r in _jsonl(folder / "answers.jsonl")},
                       {j["task_id"]: j for j in read_judgements(folder / "judgements.jsonl")})
    (base_rows, base_j), (tuned_rows, tuned_j) = sides["base"], sides["tuned"]
    tasks = [r for r in base_rows.values()] + [r for t, r in tuned_rows.items() if t not in base_rows]
    out = []
    for n, task in enumerate(tasks):
        tid = task["task_id"]
        b, t = (base_j.get(tid) or {}).get("grade"), (tuned_j.get(tid) or {}).get("grade")
        bc, tc = (base_rows.get(tid) or {}).get("chrf"), (tuned_rows.get(tid) or {}).get("chrf")
        out.append({"task": task, "base": base_rows.get(tid), "tuned": tuned_rows.get(tid),
                    "base_judgement": base_j.get(tid), "tuned_judgement": tuned_j.get(tid),
                    "grade_change": None if b is None or t is None else t - b,
                    "chrf_change": None if bc is None or tc is None else tc - bc, "order": n})
    return sorted(out, key=lambda x: (x["grade_change"] is None, -abs(x["grade_change"] or 0),
                                      -abs(x["chrf_change"] or 0), x["order"]))


def collect(workdir: Path, plan: list[str], timings: dict) -> dict[str, Any]:
    folder = {step: workdir / s.folder for step, s in STEPS.items()}
    stats = {step: _read(folder[step] / "stats.json") for step, s in STEPS.items() if s.stage != "eval"}
    stats["pairwise"] = _read(folder["pairwise"] / "pairwise.json")
    curate, synth, train = stats["curate"], stats["synth"], stats["train"]
    evals = {"base": _eval_summary(folder["eval-base"]), "tuned": _eval_summary(folder["eval-tuned"])}
    if folder["eval-sft"].is_dir():  # with a prefer or reinforce stage: SFT alone, before DPO or GRPO
        evals["sft"] = _eval_summary(folder["eval-sft"])
    dpo_diff = _grade_diff(workdir, STEPS["eval-sft"].folder)[0] if "sft" in evals else None
    grade_diff, notes = _grade_diff(workdir)
    pairs = _pairs(folder["synth"])
    docs = _documents(folder["curate"], {p["doc_id"] for p in pairs})
    for p in pairs:  # synth records each pair's source; older folders get it from the curated document
        p["source"] = p.get("source") or docs.get(p["doc_id"], {}).get("source")
    versus = _versus(evals["base"], evals["tuned"], grade_diff)
    report: dict[str, Any] = {
        "workdir": str(workdir),
        "curate": {k: curate.get(k) for k in ("docs_in", "docs_out", "bytes_in", "bytes_out", "removed_by_filter",
                                              "pages_skipped")},
        "synth": {k: synth.get(k) for k in ("documents", "requests", "pairs", "parse_rate", "pairs_per_doc",
                                            "documents_with_pairs", "rejected_by_reason", "tokens_per_s",
                                            "generator")},
        "train": {k: train.get(k) for k in ("steps", "examples", "eval_examples", "train_loss_first",
                                            "train_loss_last", "eval_loss_start", "eval_loss", "tokens_per_s",
                                            "step_s", "packing_efficiency", "qlora", "device", "seconds")},
        "prefer": {k: stats["prefer"].get(k) for k in ("instructions", "candidates", "pairs", "margin_histogram",
                                                        "margin_mean", "dpo_steps", "dpo_loss_first", "dpo_loss_last",
                                                        "held_out_before", "held_out_after")}
        if stats["prefer"] else None,
        "reinforce": {k: stats["reinforce"].get(k) for k in ("prompts", "held_out_prompts", "steps", "rewards",
                                                              "engine", "kl_first", "kl_last", "reward_first",
                                                              "reward_last", "before", "after", "gap_after")}
        if stats["reinforce"] else None,
        "eval": {**evals, "versus": versus, "notes": notes, "pairwise": stats["pairwise"] or None,
                 "dpo_versus": _versus(evals["sft"], evals["tuned"], dpo_diff) if "sft" in evals else None},
        "data_mix": _data_mix(_curated(folder["curate"]), pairs, synth, train),
        "examples": _examples(pairs, docs),
        "stages": {step: {"seconds": timings.get(step, {}).get("seconds"),
                          "summary": _stage_words(step, folder[step])} for step in plan},
    }
    ppl = next((r for r in versus if r["metric"] == "perplexity" and r["difference"] is not None), None)
    if ppl:
        report["eval"]["perplexity_change_pct"] = ppl["change_pct"]
        report["eval"]["tuned_beats_base_perplexity"] = ppl["tuned"] < ppl["base"]
    return report


# ---------------------------------------------------------------- the page (templates/run_report.html)

def _stage_png(path: Path) -> str | None:
    """A chart the stage drew itself, embedded so the report stays one file."""
    return base64.b64encode(path.read_bytes()).decode() if path.exists() else None


def _headline(report: dict) -> list[str]:
    rows = {r["metric"]: r for r in report["eval"]["versus"]}
    said = []
    if (p := rows.get("perplexity")) and p["difference"] is not None:
        said.append(f"held-out perplexity {p['tuned']:.2f} against the base model's {p['base']:.2f} "
                    f"({p['change_pct']:+.1f}%, {'better' if p['better'] == 'tuned' else 'not better'})")
    if (g := rows.get("mean_grade")) and g["difference"] == 0 and g["tuned"] == g["base"]:
        said.append(f"the same mean grade as the base model, {g['tuned']:.2f}")
    elif g and g["difference"] is not None:
        ci = g["ci95"]
        ci_words = "" if ci is None else f", 95% CI {ci[0]:+.2f} to {ci[1]:+.2f}" + (
            ", a real change" if ci[0] > 0 or ci[1] < 0 else ", within noise")
        said.append(f"mean grade {g['tuned']:.2f} against {g['base']:.2f} ({g['difference']:+.2f}{ci_words})")
    if (c := rows.get("chrf")) and c["difference"] is not None:
        said.append(f"chrF {c['tuned']:.1f} against {c['base']:.1f}")
    if report["eval"].get("pairwise"):
        said.append(f"head to head, {pairwise_words(report['eval']['pairwise'])}")
    return said


def _value(row: dict, side: str) -> str | Cell:
    text = METRICS[row["metric"]].shown(row[side])
    return Cell(f"{text} ✓", "better") if row["better"] == side else text


def _versus_rows(versus: list[dict]) -> list[list]:
    rows = []
    for r in versus:
        diff = METRICS[r["metric"]].shown(r["difference"], signed=True)
        if r.get("change_pct") is not None:
            diff += f" ({r['change_pct']:+.1f}%)"
        ci = "–" if r["ci95"] is None else f"{r['ci95'][0]:+.2f} to {r['ci95'][1]:+.2f}"
        rows.append([r["label"], _value(r, "base"), _value(r, "tuned"), diff, ci])
    return rows


def _versus_view(report: dict) -> dict | None:
    ev = report["eval"]
    if not ev["versus"]:
        return None
    base, tuned = ev["base"], ev["tuned"]
    g = next((r for r in ev["versus"] if r["metric"] == "mean_grade"), None)
    return {"base": (base.get("model") or {}).get("name"), "tuned": (tuned.get("model") or {}).get("name"),
            "rows": _versus_rows(ev["versus"]), "judge": base.get("judge") or tuned.get("judge"),
            "n_paired": g and g["n_paired"], "notes": ev.get("notes", [])}


def _prefer_view(report: dict) -> dict | None:
    """The preference step: its data (instruction → candidates → verdicts → pair) and SFT alone vs SFT+DPO."""
    p = report.get("prefer")
    if not p:
        return None
    before, after = p.get("held_out_before") or {}, p.get("held_out_after") or {}
    return {"figures": [
        ("instructions (from the SFT's own pairs)", str(p.get("instructions"))),
        ("candidates (sampled + synthesized), each graded by the judge", str(p.get("candidates"))),
        ("pairs kept (best vs worst, margin ≥ prefer.min_margin)", str(p.get("pairs"))),
        ("grade margins (best − worst: instructions)", str(p.get("margin_histogram"))),
        ("DPO loss, first → last step", f"{fmt(p.get('dpo_loss_first'))} → {fmt(p.get('dpo_loss_last'))}"),
        ("held-out log p(chosen) − log p(rejected), SFT → SFT+DPO",
         f"{fmt(before.get('logp_margin'))} → {fmt(after.get('logp_margin'))}")],
        # eval-sft against eval-tuned is SFT against SFT+DPO only where no GRPO followed the DPO
        "rows": [] if report.get("reinforce") else _versus_rows(report["eval"].get("dpo_versus") or [])}


def _reinforce_view(report: dict) -> dict | None:
    """The GRPO step: its rewards on held-out and trained prompts before and after, and SFT alone vs the final
    model (SFT+GRPO, or SFT+DPO+GRPO)."""
    r = report.get("reinforce")
    if not r:
        return None
    figures = [("prompts trained on (the SFT's instructions) + held out", f"{r.get('prompts')} + "
                                                                            f"{r.get('held_out_prompts')}"),
               ("rewards (name × weight)", ", ".join(f"{n} × {w:g}" for n, w in (r.get("rewards") or {}).items())),
               ("GRPO steps, completions from", f"{r.get('steps')}, {r.get('engine')}"),
               ("KL to the starting adapter, first → last step", f"{fmt(r.get('kl_first'))} → {fmt(r.get('kl_last'))}")]
    for kind, label in (("held_out", "held-out prompts"), ("trained", "trained prompts")):
        before, after = (r.get("before") or {}).get(kind), (r.get("after") or {}).get(kind)
        if before and after:
            each = ", ".join(f"{n} {fmt(before.get(n))} → {fmt(after.get(n))}" for n in r.get("rewards") or {}
                             if n in before)
            figures.append((f"weighted reward on {label}, before → after",
                            f"{fmt(before['reward'])} → {fmt(after['reward'])} ({each})"))
    figures.append(("trained − held-out reward after (a wide gap: a reward gamed on its prompts)",
                    fmt(r.get("gap_after"))))
    return {"figures": figures, "rows": _versus_rows(report["eval"].get("dpo_versus") or [])}


def _published(report: dict) -> dict:
    """Base and tuned beside the published figures their judge graded, and the tuned model's contamination check."""
    from ezoforge.eval import anchors, contamination

    ev = report["eval"]
    runs = [(f"{side}: {(ev[side].get('model') or {}).get('name')}", ev[side].get("anchors") or [])
            for side in ("base", "tuned")]
    return {"published": anchors.html_section(anchors.beside(runs)),
            "contamination": contamination.html_section(ev["tuned"].get("contamination")
                                                        or ev["base"].get("contamination"))}


def _curation_view(workdir: Path, report: dict) -> dict | None:
    c = report["curate"]
    if c.get("docs_in") is None:
        return None
    share = c["docs_out"] / c["docs_in"] if c["docs_in"] else None
    rows = [("Documents read", f"{c['docs_in']:,}"), ("Documents kept", f"{c['docs_out']:,} ({pct(share)})"),
            ("Text kept", f"{size_or_dash(c.get('bytes_out'))} of {size_or_dash(c.get('bytes_in'))}"),
            ("Removed, by filter", counts(c.get("removed_by_filter")))]
    if c.get("pages_skipped"):
        rows.append(("Wiki pages skipped before filtering", counts(c["pages_skipped"])))
    return {"figures": rows, "chart": _stage_png(workdir / "curate" / "filters.png")}


def _mix_view(report: dict) -> dict | None:
    mix = report["data_mix"]
    if not mix:
        return None
    keys = ("documents", "documents_drawn", "passages", "documents_with_pairs", "pairs", "pairs_trained")
    heads = ("Documents curated", "Drawn for synthesis", "Passages", "Documents with pairs", "Pairs kept",
             "Pairs trained on")
    shown = [(k, h) for k, h in zip(keys, heads) if any(r[k] is not None for r in mix)]

    def number(v: int | None) -> str:
        return "–" if v is None else f"{v:,}"
    return {"header": ["Source", *(h for _, h in shown)],
            "rows": [[r["source"]] + [number(r[k]) for k, _ in shown] for r in mix],
            "foot": ["All"] + [number(sum(r[k] or 0 for r in mix)) for k, _ in shown]}


def _synthesis_view(report: dict) -> dict | None:
    s = report["synth"]
    if s.get("pairs") is None:
        return None
    rows = [("Documents used", f"{s['documents']:,}"), ("Requests to the generator", f"{s['requests']:,}"),
            ("Pairs kept", f"{s['pairs']:,} ({fmt(s.get('pairs_per_doc'), 1)} per document)"),
            ("Documents whose outputs parsed", pct(s.get("parse_rate"))),
            ("Documents that gave kept pairs", f"{s.get('documents_with_pairs')} of {s['documents']}"),
            ("Rejected outputs, by reason", counts(s.get("rejected_by_reason"))),
            ("Generation speed", rate(s.get("tokens_per_s"))), ("Generator", str(s.get("generator")))]
    return {"figures": rows, "examples": report["examples"]}


def _training_view(workdir: Path, report: dict) -> dict | None:
    t = report["train"]
    if t.get("steps") is None:
        return None
    rows = [("Method", f"{'QLoRA (4-bit base)' if t.get('qlora') else 'LoRA'} on {t.get('device') or '–'}"),
            ("Steps", f"{t['steps']:,}"),
            ("Examples", f"{t.get('examples')} for training, {t.get('eval_examples')} held out"),
            ("Packing efficiency", pct(t.get("packing_efficiency"))),
            ("Training loss, first → last step",
             f"{fmt(t.get('train_loss_first'))} → {fmt(t.get('train_loss_last'))}"),
            ("Speed", f"{rate(t.get('tokens_per_s'))}, {fmt(t.get('step_s'), 1)} s per step"),
            ("Training time", "–" if t.get("seconds") is None else f"{t['seconds'] / 60:.1f} minutes")]
    if t.get("eval_loss") is not None:
        rows.insert(5, ("Held-out loss, start → end", f"{fmt(t.get('eval_loss_start'))} → {fmt(t['eval_loss'])}"))
    return {"figures": rows, "chart": _stage_png(workdir / "train" / "loss.png")}


def _answers_view(tasks: list[dict]) -> dict | None:
    if not tasks:
        return None
    graded = any(x["grade_change"] is not None for x in tasks)
    more = (f" The first {N_ANSWERS} of {len(tasks)}; every answer is in eval-base/ and eval-tuned/report.html."
            if len(tasks) > N_ANSWERS else "")
    return {"order": "largest grade change first" if graded else "largest chrF change first (no judge grades)",
            "more": more, "tasks": tasks[:N_ANSWERS]}


def render_page(workdir: Path, report: dict) -> str:
    stages = report["stages"]
    return render("run_report.html", model=(report["eval"]["base"].get("model") or {}).get("spec"),
                  workdir=str(workdir), headline=_headline(report),
                  stages=[[step, hms(info["seconds"]), info["summary"]] for step, info in stages.items()],
                  total=hms(sum(info["seconds"] or 0 for info in stages.values())),
                  versus=_versus_view(report), prefer=_prefer_view(report),
                  reinforce=_reinforce_view(report), **_published(report),
                  curation=_curation_view(workdir, report), mix=_mix_view(report),
                  synthesis=_synthesis_view(report), training=_training_view(workdir, report),
                  side_by_side=_answers_view(_side_by_side(workdir)))


def write_run_report(workdir: Path, plan: list[str], timings: dict) -> dict:
    report = collect(workdir, plan, timings)
    report["paths"] = {"json": str(workdir / "report.json"), "html": str(workdir / "report.html")}
    write_json(workdir / "report.json", report)
    write_text(workdir / "report.html", render_page(workdir, report))
    return report
