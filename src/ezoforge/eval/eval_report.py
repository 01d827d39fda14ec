"""report.json figures, and self-contained HTML (tables + embedded PNG charts) for one run and for comparisons.

Nothing here depends on time or on the output folder, so the same inputs give byte-identical reports.
"""
from __future__ import annotations

import base64
import html
import io
from collections import Counter

from ezoforge.eval.metrics import bootstrap_ci, rounded

GRADE_COLORS = {1: "#d73027", 2: "#fc8d59", 3: "#fee08b", 4: "#91cf60", 5: "#1a9850"}


def grade_summary(judgements: list[dict], n_tasks: int, judged: bool, allow_partial: bool, samples: int,
                  seed: int) -> dict:
    """Counts, status and — only when no judgement failed, or failures are allowed — the mean with its interval."""
    grades = [j["grade"] for j in judgements if j["grade"] is not None]
    n_failed = sum(j["error"] is not None for j in judgements)
    if not n_tasks:
        status = "complete"  # nothing to judge in this run (e.g. only jcqa or ppl)
    elif not judged:
        status = "not_judged"
    elif n_failed and (not allow_partial or not grades):
        status = "failed"
    else:
        status = "partial" if n_failed else "complete"
    usable = status in ("complete", "partial") and bool(grades)
    return {
        "status": status, "partial": status == "partial",
        "n_scored": len(grades), "n_failed": n_failed,
        "mean_grade": rounded(sum(grades) / len(grades)) if usable else None,
        "ci95": [rounded(x) for x in bootstrap_ci(grades, samples, seed)] if usable else None,
        "grade_counts": {str(g): n for g, n in sorted(Counter(grades).items())},
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


def task_chart(rows: list[dict], judgements: list[dict]) -> str | None:
    """Grades by task (failures as red crosses) above chrF by task."""
    from matplotlib.figure import Figure

    if not rows:
        return None
    panels = (["grade"] if judgements else []) + (["chrf"] if any(r["chrf"] is not None for r in rows) else [])
    if not panels:
        return None
    kinds = {r["task_id"].split("/", 1)[0] for r in rows}
    labels = [r["task_id"].split("/", 1)[1] if len(kinds) == 1 else r["task_id"] for r in rows]
    fig = Figure(figsize=(max(6.0, 0.12 * len(rows) + 2), 2.6 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        if panel == "grade":
            grades = [j["grade"] or 0 for j in judgements]
            ax.bar(range(len(grades)), grades, color=[GRADE_COLORS.get(g, "#999999") for g in grades])
            failed = [i for i, j in enumerate(judgements) if j["error"] is not None]
            ax.scatter(failed, [0.3] * len(failed), marker="x", color="#b2182b", label="judge failed", zorder=3)
            if failed:
                ax.legend(loc="upper right", fontsize=7)
            ax.set_ylim(0, 5.5)
            ax.set_ylabel("grade (1-5)")
        else:
            ax.bar(range(len(rows)), [r["chrf"] or 0 for r in rows], color="#4575b4")
            ax.set_ylabel("chrF")
        ax.set_xlim(-0.6, len(rows) - 0.4)
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


def grade_badge(judgement: dict | None) -> str:
    """The judge's grade as a coloured badge, its error in red, or nothing when there was no judge."""
    if judgement is None:
        return ""
    if judgement.get("error") is not None or judgement.get("grade") is None:
        return '<span class="grade err">judge failed</span>'
    g = judgement["grade"]
    fg = "#fff" if g in (1, 5) else "#1d232a"
    return f'<span class="grade" style="background:{GRADE_COLORS[g]};color:{fg}">{g}</span>'


def answer_html(label: str, row: dict | None, judgement: dict | None) -> str:
    """One model's answer to a task, with the judge's grade and reason (or error) and chrF against the reference."""
    if row is None:
        return f'<div><div class="label">{html.escape(label)}</div><p class="muted">not answered</p></div>'
    bits = [grade_badge(judgement)]
    if row.get("chrf") is not None:
        bits.append(f'<span class="meta">chrF {row["chrf"]:.1f}</span>')
    if row.get("finish_reason") == "length":
        bits.append('<span class="meta">· cut at max_new_tokens</span>')
    why = ""
    if judgement is not None:
        said = judgement.get("error") or judgement.get("reason") or ""
        why = f'<div class="reason"><b>Judge:</b> {clip(said, 600)}</div>' if said else ""
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
        return {"not_judged": "not judged", "failed": f"none: {report.get('n_failed')} judgement(s) failed"}.get(
            report.get("status"), "–")
    ci = report.get("ci95")
    ci_words = f" (95% CI {ci[0]:.2f}–{ci[1]:.2f})" if ci else ""
    failed = f", {report['n_failed']} failed" if report.get("n_failed") else ""
    return f"{report['mean_grade']:.2f} of 5{ci_words}, {report['n_scored']} graded{failed}"


def figures(report: dict) -> list[tuple[str, str]]:
    """An eval report's headline figures in words, those the run has only."""
    out = []
    if report.get("n_tasks"):
        out += [("Open tasks", f"{report['n_tasks']}"), ("Mean grade (judge, 1–5)", grade_words(report))]
        if report.get("chrf") is not None:
            out.append(("chrF against the references (0–100)", fmt(report["chrf"], 1)))
    if report.get("accuracy") is not None:
        out.append(("JCommonsenseQA accuracy", f"{100 * report['accuracy']:.1f}% of {report['n_choice_items']} items "
                                                 f"({report['accuracy_normalization']} scoring)"))
    if report.get("perplexity") is not None:
        out.append(("Perplexity on held-out text (lower is better)",
                    f"{report['perplexity']:.2f} over {report['ppl_tokens']:,} tokens"))
    return out


def run_html(report: dict, rows: list[dict], judgements: list[dict]) -> str:
    judge = report["judge"]
    said = (f"judged by <b>{html.escape(judge['model'])}</b> with prompt {html.escape(judge['prompt_version'])}"
            if judge else "not judged")
    body = [f"<h1>ezo eval: {html.escape(report['model']['name'])}</h1>",
            f'<p class="muted">status {html.escape(report["status"])} · {said}</p>',
            table(["Figure", "Value"], [[html.escape(k), html.escape(v)] for k, v in figures(report)]),
            png_img(task_chart(rows, judgements), "grades and chrF by task")]
    if rows:
        by_id = {j["task_id"]: j for j in judgements}
        body.append("<h2>Tasks</h2>")
        body += [f'<section class="card"><h3>{html.escape(r["task_id"])}</h3><div class="cols">{task_html(r)}'
                 f'{answer_html("Answer", r, by_id.get(r["task_id"]))}</div></section>' for r in rows]
    return page(f"ezo eval: {report['model']['name']}", body)


COMPARE_COLUMNS = ("label", "model", "judge", "status", "n_scored", "n_failed", "mean_grade", "ci95", "diff",
                   "chrf", "accuracy", "perplexity")


def compare_rows(result: dict) -> list[list[object]]:
    out = []
    for r in result["runs"]:
        d = r["diff"]
        diff = None if d is None else f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] n={d['n']}"
        ci = None if r["ci95"] is None else f"{r['ci95'][0]:.2f}–{r['ci95'][1]:.2f}"
        out.append([diff if c == "diff" else ci if c == "ci95" else r[c] for c in COMPARE_COLUMNS])
    return out


def compare_html(result: dict) -> str:
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result["notes"])
    body = ["<h1>ezo eval compare</h1>",
            f"<p>baseline: <b>{html.escape(result['baseline'])}</b>; diff = mean grade minus the baseline's over "
            "tasks graded in both runs, with a paired bootstrap 95% interval.</p>",
            table(list(COMPARE_COLUMNS), [[esc(v) for v in r] for r in compare_rows(result)]),
            png_img(compare_chart(result["runs"]), "runs compared"),
            f"<ul>{notes}</ul>" if notes else ""]
    return page("ezo eval compare", body)
