"""report.json figures, and self-contained HTML (tables + embedded PNG charts) for one run and for comparisons.

Nothing here depends on time or on the output folder, so the same inputs give byte-identical reports.
"""
from __future__ import annotations

import base64
import html
import io
from collections import Counter

from ezoforge.eval.metrics import mean_over_tasks, rounded, task_grades, task_spread

GRADE_COLORS = {1: "#d73027", 2: "#fc8d59", 3: "#fee08b", 4: "#91cf60", 5: "#1a9850"}


def grade_color(grade: float, scale: tuple[int, int]) -> str:
    """The colour of a grade's fifth of its scale (1–5: one colour per grade)."""
    lo, hi = scale
    return GRADE_COLORS[1 + round(4 * (grade - lo) / (hi - lo))]


def grade_summary(judgements: list[dict], n_tasks: int, judged: bool, allow_partial: bool, samples: int,
                  seed: int, scale: tuple[int, int] | None = (1, 5)) -> dict:
    """Counts, status and — only when no judgement failed, or failures are allowed — the mean over tasks of each
    task's mean grade, with a bootstrap-over-tasks interval. `scale` None: grades on different scales, no mean."""
    grades = [j["grade"] for j in judgements if j["grade"] is not None]
    per_task = {t: g for t, g in task_grades(judgements).items() if g}
    n_failed = sum(j["error"] is not None for j in judgements)
    if not n_tasks:
        status = "complete"  # nothing to judge in this run (e.g. only jcqa or ppl)
    elif not judged:
        status = "not_judged"
    elif n_failed and (not allow_partial or not grades):
        status = "failed"
    else:
        status = "partial" if n_failed else "complete"
    usable = status in ("complete", "partial") and bool(per_task) and scale is not None
    mean, ci = mean_over_tasks(per_task, samples, seed) if usable else (None, None)
    spreads = [task_spread(g) for g in per_task.values()]
    stds = [s["std"] for s in spreads if s["std"] is not None]
    return {
        "status": status, "partial": status == "partial",
        "n_scored": len(grades), "n_failed": n_failed, "n_tasks_scored": len(per_task),
        "mean_grade": rounded(mean), "ci95": [rounded(x) for x in ci] if ci else None,
        "scale": list(scale) if scale else None,
        "grade_counts": {str(g): n for g, n in sorted(Counter(grades).items())},
        # How much a task's grades vary over its samples x judgments (x turns): the mean and largest spread.
        "task_spread": {"mean_std": rounded(sum(stds) / len(stds)),
                        "max_range": rounded(max(s["max"] - s["min"] for s in spreads))} if stds else None,
    }


# ---------------------------------------------------------------- charts

def png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})  # no version stamp: stable bytes
    return base64.b64encode(buf.getvalue()).decode()


def _ticks(ax, labels: list[str]) -> None:
    step = max(1, len(labels) // 30)
    ax.set_xticks(range(0, len(labels), step))
    ax.set_xticklabels(labels[::step], rotation=90, fontsize=7)


def task_chart(report: dict, rows: list[dict]) -> str | None:
    """Each task's mean grade with its min–max over samples x judgments (x turns), above chrF by task."""
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r["task_id"] for r in rows))
    if not tasks:
        return None
    spread = {t["task_id"]: t for t in report.get("per_task") or []}
    chrf: dict[str, list[float]] = {}
    for r in rows:
        if r["chrf"] is not None:
            chrf.setdefault(r["task_id"], []).append(r["chrf"])
    panels = (["grade"] if report.get("judge") else []) + (["chrf"] if chrf else [])
    if not panels:
        return None
    kinds = {t.split("/", 1)[0] for t in tasks}
    labels = [t.split("/", 1)[1] if len(kinds) == 1 else t for t in tasks]
    fig = Figure(figsize=(max(6.0, 0.12 * len(tasks) + 2), 2.6 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        if panel == "grade":
            scale = tuple(report.get("scale") or (1, 10))
            means = [spread[t]["mean"] if t in spread else 0 for t in tasks]
            low = [m - spread[t]["min"] if t in spread else 0 for t, m in zip(tasks, means)]
            high = [spread[t]["max"] - m if t in spread else 0 for t, m in zip(tasks, means)]
            ax.bar(range(len(tasks)), means, yerr=[low, high], capsize=2,
                   color=[grade_color(m, scale) if t in spread else "#999999" for t, m in zip(tasks, means)])
            ungraded = [i for i, t in enumerate(tasks) if t not in spread]
            ax.scatter(ungraded, [0.3] * len(ungraded), marker="x", color="#b2182b", label="judge failed", zorder=3)
            if ungraded:
                ax.legend(loc="upper right", fontsize=7)
            ax.set_ylim(0, scale[1] + 0.5)
            ax.set_ylabel(f"mean grade ({scale[0]}-{scale[1]})" if report.get("scale") else "mean grade")
        else:
            ax.bar(range(len(tasks)), [sum(chrf.get(t, [0])) / len(chrf.get(t, [0])) for t in tasks], color="#4575b4")
            ax.set_ylabel("chrF")
        ax.set_xlim(-0.6, len(tasks) - 0.4)
        _ticks(ax, labels)
    axes[0].set_title(f"by task ({', '.join(sorted(kinds))})")
    return png_base64(fig)


def compare_chart(runs: list[dict]) -> str | None:
    from matplotlib.figure import Figure

    metrics = [m for m in ("mean_grade", "chrf", "accuracy", "perplexity") if any(r[m] is not None for r in runs)]
    if not metrics:
        return None
    names = [r["label"] for r in runs]
    fig = Figure(figsize=(3.2 * len(metrics) + 1, 3.4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
        values = [r[metric] if r[metric] is not None else 0.0 for r in runs]
        err = None
        if metric == "mean_grade":
            err = [[max(v - (r["ci95"] or [v, v])[0], 0) for v, r in zip(values, runs)],
                   [max((r["ci95"] or [v, v])[1] - v, 0) for v, r in zip(values, runs)]]
        ax.bar(range(len(runs)), values, yerr=err, capsize=4, color="#4575b4")
        ax.set_title(metric + (" (95% CI)" if metric == "mean_grade" else ""), fontsize=9)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    return png_base64(fig)


# ---------------------------------------------------------------- HTML shared with the run report

# One style for every page: Japanese fonts first-class, one column on a phone, wide tables scroll in their own box.
STYLE = """
*{box-sizing:border-box}
body{margin:0 auto;padding:16px 20px 40px;max-width:1100px;color:#1d232a;background:#fff;line-height:1.65;
font-size:15px;font-family:-apple-system,BlinkMacSystemFont,"Hiragino Sans","Hiragino Kaku Gothic ProN",
"Noto Sans CJK JP","Noto Sans JP","Yu Gothic UI","Yu Gothic",Meiryo,"Segoe UI",system-ui,sans-serif}
h1{font-size:1.6em;margin:.3em 0 .2em;line-height:1.3}
h2{font-size:1.25em;margin:1.8em 0 .6em;padding-bottom:.2em;border-bottom:2px solid #d9dee3}
h3{font-size:1.05em;margin:0 0 .4em}
p{margin:.4em 0}
a{color:#2f6fb0}
.muted{color:#5f6b76;font-size:.92em}
.lead{font-size:1.05em;background:#f1f6fb;border-left:4px solid #2f6fb0;padding:8px 14px;border-radius:4px}
.scroll{overflow-x:auto;margin:.4em 0 1em}
table{border-collapse:collapse}
th,td{border-bottom:1px solid #d9dee3;padding:6px 12px;text-align:left;vertical-align:top}
thead th{background:#f5f7f9;border-bottom:2px solid #c9d0d6}
tbody th{font-weight:600}
tfoot td,tfoot th{border-top:2px solid #c9d0d6;font-weight:600}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.better{font-weight:700;color:#1a7f37}
.up{color:#1a7f37;font-weight:600}.down{color:#b42318;font-weight:600}
.err{color:#b42318}
img{max-width:100%;height:auto;display:block;margin:.5em 0}
figure{margin:1em 0}figcaption{color:#5f6b76;font-size:.9em}
.card{border:1px solid #d9dee3;border-radius:8px;padding:12px 16px;margin:14px 0}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(280px,1fr));gap:10px 16px}
.meta{color:#5f6b76;font-size:.85em}
.label{display:inline-block;font-size:.78em;letter-spacing:.04em;color:#5f6b76;font-weight:700;
text-transform:uppercase;margin-top:.4em}
.text{white-space:pre-wrap;overflow-wrap:anywhere;background:#f5f7f9;border-radius:6px;padding:6px 10px;
margin:2px 0 6px}
.reason{white-space:pre-wrap;overflow-wrap:anywhere;color:#3d4852;font-size:.92em}
.grade{display:inline-block;min-width:1.9em;text-align:center;border-radius:4px;padding:0 6px;font-weight:700}
.arrow{color:#5f6b76;text-align:center;font-size:1.2em;margin:2px 0}
@media (max-width:600px){body{padding:10px 12px 30px;font-size:14px}th,td{padding:5px 8px}}
"""
_TEXT_LIMIT = 1500  # characters of one task text or answer shown; the JSONL beside the report has it whole


def esc(value: object) -> str:
    return html.escape("–" if value is None else str(value))


def clip(text: str | None, limit: int = _TEXT_LIMIT) -> str:
    """Escaped text, cut at `limit` characters with a note of what was left out."""
    if text is None:
        return "–"
    if len(text) <= limit:
        return html.escape(text)
    return html.escape(text[:limit]) + f'<span class="muted"> … ({len(text) - limit:,} more characters)</span>'


def page(title: str, body: list[str]) -> str:
    return ('<!doctype html>\n<html lang="ja"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(b for b in body if b) + "\n</body></html>\n")


def table(header: list[str], rows: list[list[str]], foot: list[str] | None = None, num: tuple[int, ...] = ()) -> str:
    """A table of already-escaped cells; columns in `num` are right-aligned figures, the first column a row header."""
    def row(cells: list[str], tag: str = "td") -> str:
        out = []
        for i, c in enumerate(cells):
            cls = ' class="num"' if i in num else ""
            if c.startswith("<td") or c.startswith("<th"):  # a cell that carries its own class
                out.append(c)
            else:
                out.append(f"<th{cls}>{c}</th>" if i == 0 and tag == "td" else f"<{tag}{cls}>{c}</{tag}>")
        return "<tr>" + "".join(out) + "</tr>"
    head = "<thead>" + row(header, "th") + "</thead>"
    tail = f"<tfoot>{row(foot)}</tfoot>" if foot else ""
    return f'<div class="scroll"><table>{head}<tbody>{"".join(row(r) for r in rows)}</tbody>{tail}</table></div>'


def png_img(png: str | None, alt: str, caption: str = "") -> str:
    if not png:
        return ""
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">{cap}</figure>'


def _scale_of(judgement: dict) -> tuple[int, int]:
    return (1, 5) if judgement.get("prompt_version", "").startswith("ezo-judge-ja") else (1, 10)


def grade_badge(judgement: dict | None) -> str:
    """The judge's grade as a coloured badge, its error in red, or nothing when there was no judge."""
    if judgement is None:
        return ""
    if judgement.get("error") is not None or judgement.get("grade") is None:
        return '<span class="grade err">judge failed</span>'
    g, scale = judgement["grade"], _scale_of(judgement)
    color = grade_color(g, scale)
    fg = "#fff" if color in (GRADE_COLORS[1], GRADE_COLORS[5]) else "#1d232a"
    return f'<span class="grade" style="background:{color};color:{fg}" title="of {scale[1]}">{g:g}</span>'


def answer_html(label: str, row: dict | None, judgement: dict | list[dict] | None) -> str:
    """One model's answer to a task, with each verdict's grade and reason (or error) and chrF against the reference."""
    if row is None:
        return f'<div><div class="label">{html.escape(label)}</div><p class="muted">not answered</p></div>'
    verdicts = judgement if isinstance(judgement, list) else [judgement] if judgement else []
    bits = [grade_badge(j) for j in verdicts]
    if row.get("chrf") is not None:
        bits.append(f'<span class="meta">chrF {row["chrf"]:.1f}</span>')
    if row.get("finish_reason") == "length":
        bits.append('<span class="meta">· cut at max_new_tokens</span>')
    why = ""
    for n, j in enumerate(verdicts, 1):
        said = j.get("error") or j.get("reason") or ""
        who = "Judge" if len(verdicts) == 1 else f"Judgment {n}"
        why += f'<div class="reason"><b>{who}:</b> {clip(said, 600)}</div>' if said else ""
    return (f'<div><div><span class="label">{html.escape(label)}</span> {" ".join(b for b in bits if b)}</div>'
            f'<div class="text">{clip(row["answer"])}</div>{why}</div>')


def task_html(row: dict) -> str:
    """The task's input and reference answer."""
    ref = (f'<div><div class="label">Reference answer</div><div class="text">{clip(row["reference"])}</div></div>'
           if row.get("reference") is not None else "")
    return f'<div><div class="label">Question</div><div class="text">{clip(row["prompt"])}</div></div>{ref}'


def fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def grade_words(report: dict) -> str:
    """"2.50 of 5 (95% CI 1.75–3.25), 4 graded" — or why there is no mean."""
    if report.get("mean_grade") is None:
        if report.get("status") in ("complete", "partial") and report.get("n_tasks") and not report.get("scale"):
            return "per suite only: the suites are graded on different scales"
        return {"not_judged": "not judged", "failed": f"none: {report.get('n_failed')} judgement(s) failed"}.get(
            report.get("status"), "–")
    ci = report.get("ci95")
    ci_words = f" (95% CI {ci[0]:.2f}–{ci[1]:.2f})" if ci else ""
    failed = f", {report['n_failed']} failed" if report.get("n_failed") else ""
    scale = report.get("scale") or (1, 5)
    return f"{report['mean_grade']:.2f} of {scale[1]}{ci_words}, {report['n_scored']} graded{failed}"


def protocol_words(report: dict) -> str | None:
    """"3 samples × 3 judgments per task (temperature 0.7, judge 0.7)" for a judged report."""
    p = report.get("protocol")
    if not p or not report.get("judge"):
        return None
    return (f"{p['samples']} sample(s) × {p['judgments']} judgment(s) per task (generation temperature "
            f"{p['temperature']:g}, judge temperature {p['judge_temperature']:g}); a task's grade is their mean, the "
            "interval a bootstrap over tasks")


def figures(report: dict) -> list[tuple[str, str]]:
    """An eval report's headline figures in words, those the run has only."""
    out = []
    if report.get("n_tasks"):
        scale = report.get("scale")
        out += [("Open tasks", f"{report['n_tasks']}"),
                (f"Mean grade (judge, {scale[0]}–{scale[1]})" if scale else "Mean grade (judge)", grade_words(report))]
        if protocol_words(report):
            out.append(("Protocol", protocol_words(report)))
        if report.get("task_spread"):
            spread = report["task_spread"]
            out.append(("Spread within a task", f"mean std {spread['mean_std']:.2f}, widest min–max range "
                                                 f"{spread['max_range']:.2f}"))
        for kind, sub in (report.get("by_suite") or {}).items():
            if sub.get("n_tasks"):
                out.append((f"{kind} (judge, {sub['scale'][0]}–{sub['scale'][1]})", grade_words(sub)))
        mt = report.get("mt_bench")
        for name, fig in ((mt or {}).get("by_turn") or {}).items():
            out.append((f"MT-Bench turn {name} (1–10)", fmt(fig["mean_grade"])))
        for name, fig in ((mt or {}).get("by_category") or {}).items():
            out.append((f"MT-Bench {name} (1–10)", fmt(fig["mean_grade"])))
        if report.get("chrf") is not None:
            out.append(("chrF against the references (0–100)", fmt(report["chrf"], 1)))
    if report.get("accuracy") is not None:
        out.append(("JCommonsenseQA accuracy", f"{100 * report['accuracy']:.1f}% of {report['n_choice_items']} items "
                                                 f"({report['accuracy_normalization']} scoring)"))
    if report.get("perplexity") is not None:
        out.append(("Perplexity on held-out text (lower is better)",
                    f"{report['perplexity']:.2f} over {report['ppl_tokens']:,} tokens"))
    return out


def judge_words(judge: dict | None) -> str:
    """"judged by gpt-4o (served as gpt-4o-2024-08-06, fp_…) with prompt …", or "not judged"."""
    if not judge:
        return "not judged"
    served = judge.get("served") or []
    prints = judge.get("system_fingerprints") or []
    as_served = f" (served as {', '.join(served)}" + (f"; {', '.join(prints)}" if prints else "") + ")" if served else ""
    return f"judged by {judge['model']}{as_served} with prompt {judge['prompt_version']}"


def run_extras_html(report: dict) -> list[str]:
    """The run beside the published figures graded by its judge, and the contamination check."""
    from ezoforge.eval import anchors, contamination

    run = (f"this run: {report['model']['name']}", report.get("anchors") or [])
    return [anchors.html_section(anchors.beside([run])), contamination.html_section(report.get("contamination"))]


def run_html(report: dict, rows: list[dict], judgements: list[dict]) -> str:
    judge = report["judge"]
    notes = "".join(f'<p class="err">{html.escape(n)}</p>' for n in (judge or {}).get("notes", []))
    body = [f"<h1>ezo eval: {html.escape(report['model']['name'])}</h1>",
            f'<p class="muted">status {html.escape(report["status"])} · {html.escape(judge_words(judge))}</p>', notes,
            table(["Figure", "Value"], [[html.escape(k), html.escape(v)] for k, v in figures(report)]),
            png_img(task_chart(report, rows), "mean grade and chrF by task"), *run_extras_html(report)]
    if report.get("per_task") and max(t["n"] for t in report["per_task"]) > 1:
        body += ["<h2>Grades within each task</h2>",
                 table(["Task", "Verdicts", "Mean", "Std", "Min", "Max"],
                       [[esc(t["task_id"]), esc(t["n"]), fmt(t["mean"]), fmt(t["std"]), fmt(t["min"]), fmt(t["max"])]
                        for t in report["per_task"]], num=(1, 2, 3, 4, 5))]
    if rows:
        verdicts: dict[tuple, list[dict]] = {}
        for j in judgements:
            verdicts.setdefault((j["task_id"], j.get("sample", 0), j.get("turn", 1)), []).append(j)
        body.append("<h2>Tasks</h2>")
        by_task: dict[str, list[dict]] = {}
        for r in rows:
            by_task.setdefault(r["task_id"], []).append(r)
        for task_id, task_rows in by_task.items():
            many = len(task_rows) > 1
            answers = "".join(
                (f'<div><div class="label">Turn {r["turn"]}</div><div class="text">{clip(r["prompt"])}</div></div>'
                 if r["turn"] > 1 else "")
                + answer_html(f"Sample {r['sample'] + 1}, turn {r['turn']}" if many else "Answer", r,
                              verdicts.get((task_id, r["sample"], r["turn"]), []))
                for r in task_rows)
            body.append(f'<section class="card"><h3>{html.escape(task_id)}</h3><div class="cols">'
                        f'{task_html(task_rows[0])}{answers}</div></section>')
    return page(f"ezo eval: {report['model']['name']}", body)


COMPARE_COLUMNS = ("label", "model", "judge", "protocol", "status", "n_scored", "n_failed", "mean_grade", "ci95",
                   "diff", "chrf", "accuracy", "perplexity")
DIFFERENT_JUDGES = "JUDGES DIFFER: grades under different judges or judge prompts are not comparable and are not paired"


def compare_rows(result: dict) -> list[list[object]]:
    out = []
    for r in result["runs"]:
        d = r["diff"]
        diff = None if d is None else f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] n={d['n']}"
        ci = None if r["ci95"] is None else f"{r['ci95'][0]:.2f}–{r['ci95'][1]:.2f}"
        out.append([diff if c == "diff" else ci if c == "ci95" else r.get(c) for c in COMPARE_COLUMNS])
    return out


def compare_html(result: dict) -> str:
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result["notes"])
    body = ["<h1>ezo eval compare</h1>",
            f'<p class="err"><b>{html.escape(DIFFERENT_JUDGES)}</b></p>' if result.get("different_judges") else "",
            f"<p>baseline: <b>{html.escape(result['baseline'])}</b>; diff = mean grade minus the baseline's over "
            "tasks graded in both runs, with a paired bootstrap 95% interval.</p>",
            table(list(COMPARE_COLUMNS), [[esc(v) for v in r] for r in compare_rows(result)]),
            png_img(compare_chart(result["runs"]), "runs compared"),
            f"<ul>{notes}</ul>" if notes else ""]
    return page("ezo eval compare", body)
