"""The one small kit every report is rendered with: Jinja2 templates from ezoforge/templates (autoescaped: a value
is escaped where it is written into the page, never by hand), the colours of grades, and the charts the pages embed.

base.html is the layout, kit.css its style, kit.html the table, chart and text macros; answers.html shows a task and
its answers and verdicts. Nothing here depends on time or on a folder, so the same inputs give byte-identical pages.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from ezoforge.errors import size
from ezoforge.metric_catalogue import Metric

GRADE_COLORS = {1: "#d73027", 2: "#fc8d59", 3: "#fee08b", 4: "#91cf60", 5: "#1a9850"}
DPI = 90


@dataclass(frozen=True)
class Cell:
    """A table cell that is more than its text: with a class (`better`), in bold, or a link."""
    text: str
    cls: str = ""
    bold: bool = False
    href: str | None = None


def fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def pct(x: float | None, digits: int = 0) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def rate(tokens_per_s: float | None) -> str:
    if tokens_per_s is None:
        return "–"
    return f"{tokens_per_s:,.0f} tokens/s" if tokens_per_s >= 10 else f"{tokens_per_s:.1f} tokens/s"


def size_or_dash(n_bytes: int | None) -> str:
    return "–" if n_bytes is None else size(n_bytes)


def plural(n: int | None, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{'–' if n is None else f'{n:,}'} {noun}s"


def counts(by_name: dict[str, int] | None) -> str:
    """{"too_short": 5, "duplicate": 4} → "too_short 5, duplicate 4", largest first."""
    return ", ".join(f"{k} {v:,}" for k, v in sorted((by_name or {}).items(), key=lambda kv: -kv[1])) or "none"


def grade_color(grade: float, scale: tuple[int, int]) -> str:
    """The colour of a grade's fifth of its scale (1–5: one colour per grade)."""
    lo, hi = scale
    return GRADE_COLORS[1 + round(4 * (grade - lo) / (hi - lo))]


def grade_badge(judgement: dict) -> dict:
    """A graded verdict's badge: its colour, a text colour that reads on it, and the top of its scale."""
    # ELYZA's rubric (prompt ezo-judge-ja-*) grades 1–5; MT-Bench's 1–10.
    scale = (1, 5) if judgement.get("prompt_version", "").startswith("ezo-judge-ja") else (1, 10)
    color = grade_color(judgement["grade"], scale)
    return {"background": color, "ink": "#fff" if color in (GRADE_COLORS[1], GRADE_COLORS[5]) else "#1d232a",
            "of": scale[1]}


_ENV = Environment(loader=PackageLoader("ezoforge", "templates"), autoescape=True, undefined=StrictUndefined,
                   trim_blocks=True, lstrip_blocks=True)
_ENV.filters.update(fmt=fmt, dash=lambda v: "–" if v is None else v)
_ENV.tests["cell"] = lambda v: isinstance(v, Cell)
_ENV.globals["grade_badge"] = grade_badge


def render(template: str, **context) -> Markup:
    """A template of ezoforge/templates filled in; Markup, so a page can take it as a section unescaped."""
    return Markup(_ENV.get_template(template).render(**context))


# ---------------------------------------------------------------- charts

def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})  # no version stamp: stable bytes
    return buf.getvalue()


def png_base64(fig) -> str:
    return base64.b64encode(png_bytes(fig)).decode()


def metric_bars(runs: list[tuple[str, dict]], metrics: dict[str, Metric]):
    """One bar per run for each of the `metrics` any run has, the mean grade with its 95% CI: the chart of `ezo eval
    compare` and of the model card. `runs`: (name, eval figures) with the first the baseline. None when there is no
    figure."""
    from matplotlib.figure import Figure

    keys = [k for k in metrics if any(r.get(k) is not None for _, r in runs)]
    if not keys:
        return None
    names = [name for name, _ in runs]
    long_names = max(len(n) for n in names) > 8  # folder names: slanted, in small type
    fig = Figure(figsize=(3.2 * len(keys) + 0.5, 3.4), layout="constrained")
    for ax, key in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys):
        values = [r.get(key) or 0.0 for _, r in runs]
        err = None
        if key == "mean_grade":
            cis = [r.get("ci95") or [v, v] for v, (_, r) in zip(values, runs)]
            err = [[max(v - ci[0], 0) for v, ci in zip(values, cis)], [max(ci[1] - v, 0) for v, ci in zip(values, cis)]]
            scales = [r.get("scale") for _, r in runs]
            if all(scales):
                ax.set_ylim(0, max(s[1] for s in scales) + 0.2)
        bars = ax.bar(range(len(runs)), values, yerr=err, capsize=4,
                      color=["#8c8c8c"] + ["#4f81bd"] * (len(runs) - 1))  # the baseline grey
        ax.bar_label(bars, fmt="%.4g", label_type="center", color="white")
        ax.set_title(metrics[key].short + (" (95% CI)" if err else ""), fontsize=9)
        ax.set_xticks(range(len(runs)))
        if long_names:
            ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        else:
            ax.set_xticklabels(names)
    return fig
