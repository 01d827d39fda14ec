"""How an eval's figure reads: one label, one direction and one format (a Metric), declared by the task type that
reports it (eval/task_types/, gathered in eval.tasks.METRICS); the eval report, `ezo eval compare`, the run report,
the model card and their charts all read them from there."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    label: str  # a report's row
    short: str  # a chart's title, the model card's row
    brief: str  # its name in a one-line summary (the run report's stage line)
    higher_is_better: bool
    digits: int  # shown after the point
    percent: bool = False  # a 0–1 share shown as a percentage; a difference of two in points

    def shown(self, x: float | None, signed: bool = False) -> str:
        """The value (or a difference, `signed`) as the reports print it."""
        if x is None:
            return "–"
        sign = "+" if signed else ""
        if self.percent:
            return f"{100 * x:{sign}.{self.digits}f}" + (" pt" if signed else "%")
        return f"{x:{sign},.{self.digits}f}"


def grade_scale(report: dict) -> tuple[int, int] | None:
    """The scale an eval report's (or suite's) grades are on; None where its suites are graded on different scales,
    which then have no mean together."""
    return tuple(report["scale"]) if report.get("scale") else None


def grade_words(report: dict) -> str:
    """"2.50 of 5 (95% CI 1.75–3.25), 4 graded" for an eval report (or one of its suites) — or why there is no mean."""
    if report.get("mean_grade") is None:
        if report.get("status") in ("complete", "partial") and report.get("n_tasks") and not grade_scale(report):
            return "per suite only: the suites are graded on different scales"
        return {"not_judged": "not judged", "failed": f"none: {report.get('n_failed')} judgement(s) failed"}.get(
            report.get("status"), "–")
    ci = report.get("ci95")
    ci_words = f" (95% CI {ci[0]:.2f}–{ci[1]:.2f})" if ci else ""
    failed = f", {report['n_failed']} failed" if report.get("n_failed") else ""
    return f"{report['mean_grade']:.2f} of {grade_scale(report)[1]}{ci_words}, {report['n_scored']} graded{failed}"
