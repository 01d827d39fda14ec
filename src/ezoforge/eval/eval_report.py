"""report.json figures, and the eval report and compare page (report_kit's templates, with embedded PNG charts).

Nothing here depends on time or on the output folder, so the same inputs give byte-identical reports.
"""
from __future__ import annotations

from collections import Counter

from ezoforge.eval.metrics import mean_over_tasks, rounded, task_grades, task_spread
from ezoforge.metric_catalogue import METRICS, grade_words
from ezoforge.report_kit import fmt, grade_color, metric_bars, png_base64, render


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


# ---------------------------------------------------------------- pages

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
        label = METRICS["mean_grade"].label
        out += [("Open tasks", f"{report['n_tasks']}"),
                (f"{label}, {scale[0]}–{scale[1]}" if scale else label, grade_words(report))]
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
            out.append((METRICS["chrf"].label, METRICS["chrf"].shown(report["chrf"])))
    if report.get("accuracy") is not None:
        out.append((METRICS["accuracy"].label, f"{METRICS['accuracy'].shown(report['accuracy'])} of "
                                               f"{report['n_choice_items']} items "
                                               f"({report['accuracy_normalization']} scoring)"))
    if report.get("perplexity") is not None:
        out.append((METRICS["perplexity"].label,
                    f"{METRICS['perplexity'].shown(report['perplexity'])} over {report['ppl_tokens']:,} tokens"))
    return out


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
    chart = metric_bars([(r["label"], r) for r in result["runs"]])
    return render("eval_compare.html", different_judges=DIFFERENT_JUDGES if result.get("different_judges") else None,
                  baseline=result["baseline"], columns=COMPARE_COLUMNS, rows=compare_rows(result),
                  chart=png_base64(chart) if chart else None, notes=result["notes"])
