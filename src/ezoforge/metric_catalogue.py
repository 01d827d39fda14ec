"""The figures an eval reports, each with one label, one direction and one format: the eval report, `ezo eval
compare`, the run report, the model card and their charts all read them here."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    label: str  # a report's row
    short: str  # a chart's title, the model card's row
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


METRICS = {
    "mean_grade": Metric("Mean grade (LLM judge)", "mean grade (LLM judge)", True, 2),
    "chrf": Metric("chrF vs the references (0–100)", "chrF", True, 1),
    "accuracy": Metric("JCommonsenseQA accuracy", "JCommonsenseQA accuracy", True, 1, percent=True),
    "perplexity": Metric("Perplexity on held-out text (lower is better)", "held-out perplexity (lower is better)",
                         False, 2),
}


def grade_words(report: dict) -> str:
    """"2.50 of 5 (95% CI 1.75–3.25), 4 graded" for an eval report (or one of its suites) — or why there is no mean."""
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
