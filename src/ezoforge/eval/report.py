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

def _png(fig) -> str:
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
    return _png(fig)


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
    return _png(fig)


# ---------------------------------------------------------------- HTML

_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px}th{background:#eee}"
          "td{max-width:420px;white-space:pre-wrap}.err{color:#b2182b}")


def _page(title: str, body: list[str]) -> str:
    return (f"<!doctype html><html lang=\"ja\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def _table(header: list[str], rows: list[list[object]], raw_cols: tuple[int, ...] = ()) -> str:
    def cell(i: int, v: object) -> str:
        text = "–" if v is None else str(v)
        return f"<td>{text}</td>" if i in raw_cols else f"<td>{html.escape(text)}</td>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: str | None) -> str:
    return f'<img alt="chart" src="data:image/png;base64,{png}">' if png else ""


SUMMARY_KEYS = ("status", "n_tasks", "n_scored", "n_failed", "mean_grade", "ci95", "chrf", "accuracy",
                "accuracy_normalization", "n_choice_items", "perplexity", "ppl_tokens")


def run_html(report: dict, rows: list[dict], judgements: list[dict]) -> str:
    judge = report["judge"]
    body = [f"<p>model <b>{html.escape(report['model']['name'])}</b> · judge "
            f"<b>{html.escape(judge['model'] + ' / ' + judge['prompt_version']) if judge else 'none (not judged)'}</b></p>",
            _table(["figure", "value"], [[k, report[k]] for k in SUMMARY_KEYS if k in report]),
            _img(task_chart(rows, judgements))]
    if rows:
        by_id = {j["task_id"]: j for j in judgements}
        table = []
        for r in rows:
            j = by_id.get(r["task_id"])
            verdict = "" if j is None else (str(j["grade"]) if j["error"] is None
                                            else f'<span class="err">{html.escape(j["error"])}</span>')
            table.append([r["task_id"], verdict, rounded(r["chrf"], 1), html.escape(r["answer"][:400]),
                          html.escape((j or {}).get("reason", "")[:400])])
        body += ["<h2>tasks</h2>", _table(["task", "grade", "chrF", "answer", "judge's reason"], table, (1, 3, 4))]
    return _page(f"ezo eval: {report['model']['name']}", body)


COMPARE_COLUMNS = ("label", "model", "judge", "status", "n_scored", "n_failed", "mean_grade", "ci95", "diff",
                   "chrf", "accuracy", "perplexity")


def compare_rows(result: dict) -> list[list[object]]:
    out = []
    for r in result["runs"]:
        d = r["diff"]
        diff = None if d is None else f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] n={d['n']}"
        out.append([diff if c == "diff" else r[c] for c in COMPARE_COLUMNS])
    return out


def compare_html(result: dict) -> str:
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result["notes"])
    body = [f"<p>baseline: <b>{html.escape(result['baseline'])}</b>; diff = mean grade minus the baseline's over "
            "tasks graded in both runs, with a paired bootstrap 95% interval.</p>",
            _table(list(COMPARE_COLUMNS), compare_rows(result)), _img(compare_chart(result["runs"])),
            f"<ul>{notes}</ul>" if notes else ""]
    return _page("ezo eval compare", body)
