"""The eval report and compare page (report_kit's templates, with embedded PNG charts), their figures in words from
each task type's Scoring.

Nothing here depends on time or on the output folder, so the same inputs give byte-identical reports.
"""
from __future__ import annotations

from pathlib import Path

from ezoforge.eval.tasks import METRICS, scorings
from ezoforge.metric_catalogue import grade_scale, grade_words
from ezoforge.report_kit import fmt, grade_color, metric_bars, png_base64, render


def scored_as(model: dict | None) -> str | None:
    """Which form of a model an eval scored, in words, from report.json's `model`: base + adapter or a whole model,
    and how its weights were held."""
    if not model:
        return None
    held = f" in {model['quantize']}" if model.get("quantize") not in (None, "none") else ""
    if model.get("adapter"):
        return f"the base{held} + the adapter"
    engine = f" on {model['backend']}" if model.get("backend") and model.get("quantize") is None else ""
    return f"the whole model{held}{engine}"


# ---------------------------------------------------------------- charts

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
            scale = grade_scale(report) or (1, 10)  # suites on different scales: drawn on the widest, MT-Bench's
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
            ax.set_ylabel(f"mean grade ({scale[0]}-{scale[1]})" if grade_scale(report) else "mean grade")
        else:
            ax.bar(range(len(tasks)), [sum(chrf.get(t, [0])) / len(chrf.get(t, [0])) for t in tasks], color="#4575b4")
            ax.set_ylabel("chrF")
        ax.set_xlim(-0.6, len(tasks) - 0.4)
        _ticks(ax, labels)
    axes[0].set_title(f"by task ({', '.join(sorted(kinds))})")
    return png_base64(fig)


# ---------------------------------------------------------------- pages

def figures(report: dict) -> list[tuple[str, str]]:
    """An eval report's headline figures in words, those the run has only."""
    return [line for scoring in scorings() for line in scoring.words(report)]


def judge_words(judge: dict | None) -> str:
    """"judged by gpt-4o (served as gpt-4o-2024-08-06, fp_…) with prompt …", or "not judged"."""
    if not judge:
        return "not judged"
    served = judge.get("served") or []
    prints = judge.get("system_fingerprints") or []
    as_served = f" (served as {', '.join(served)}" + (f"; {', '.join(prints)}" if prints else "") + ")" if served else ""
    return f"judged by {judge['model']}{as_served} with prompt {judge['prompt_version']}"


def _tasks(rows: list[dict], judgements: list[dict]) -> list[dict]:
    """Each task's answers (samples x turns) in order, each with its verdicts."""
    verdicts: dict[tuple, list[dict]] = {}
    for j in judgements:
        verdicts.setdefault((j["task_id"], j.get("sample", 0), j.get("turn", 1)), []).append(j)
    tasks: dict[str, list[dict]] = {}
    for r in rows:
        tasks.setdefault(r["task_id"], []).append(
            {"row": r, "verdicts": verdicts.get((r["task_id"], r["sample"], r["turn"]), [])})
    return [{"id": task_id, "answers": answers} for task_id, answers in tasks.items()]


def run_html(report: dict, rows: list[dict], judgements: list[dict]) -> str:
    from ezoforge.eval import anchors, contamination

    per_task = report.get("per_task") or []
    spread = [[t["task_id"], t["n"], fmt(t["mean"]), fmt(t["std"]), fmt(t["min"]), fmt(t["max"])] for t in per_task]
    run = (f"this run: {report['model']['name']}", report.get("anchors") or [])
    return render("eval_run.html", model=report["model"]["name"], status=report["status"],
                  judge=judge_words(report["judge"]), notes=(report["judge"] or {}).get("notes", []),
                  figures=figures(report), task_chart=task_chart(report, rows),
                  published=anchors.html_section(anchors.beside([run])),
                  contamination=contamination.html_section(report.get("contamination")),
                  spread=spread if per_task and max(t["n"] for t in per_task) > 1 else [],
                  tasks=_tasks(rows, judgements))


# The mean grade with its interval and the paired difference, then every other figure.
COMPARE_COLUMNS = ("label", "model", "judge", "protocol", "status", "n_scored", "n_failed", "mean_grade", "ci95",
                   "diff", *(key for key in METRICS if key != "mean_grade"))
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
    chart = metric_bars([(r["label"], r) for r in result["runs"]], METRICS)
    return render("eval_compare.html", different_judges=DIFFERENT_JUDGES if result.get("different_judges") else None,
                  baseline=result["baseline"], columns=COMPARE_COLUMNS, rows=compare_rows(result),
                  chart=png_base64(chart) if chart else None, notes=result["notes"])


def pairwise_words(result: dict) -> str:
    """One sentence per run against the baseline, as the run report and the card say it."""
    said = []
    for r in result.get("against", []):
        ci = "" if r["ci95"] is None else f" [95% CI {r['ci95'][0]:.2f}–{r['ci95'][1]:.2f}]"
        rate = "–" if r["win_rate"] is None else f"{r['win_rate']:.2f}"
        said.append(f"{Path(r['other']).name} against {Path(result['baseline']).name}: win rate {rate}{ci} "
                    f"over {r['pairs']} pairs ({r['wins']} won, {r['ties']} tied, {r['losses']} lost; the two orders "
                    f"disagreed on {r['disagreements']})")
    return "; ".join(said) or "no pairs"


def words(e: dict) -> str:
    """An eval's headline figures in one line (its report.json, or the run report's summary of it)."""
    parts = [f"{metric.brief} {metric.shown(e[key])}" for key, metric in METRICS.items()
             if key != "mean_grade" and e.get(key) is not None]
    if e.get("mean_grade") is not None:
        grade = METRICS["mean_grade"]
        parts.append(f"{grade.brief} {grade.shown(e['mean_grade'])} of {grade_scale(e)[1]}")
    elif e.get("n_tasks"):
        parts.append(grade_words(e))
    if (form := scored_as(e.get("model"))) is not None:
        parts.append(f"scored {form}")
    return " · ".join(parts) or "no figures"
