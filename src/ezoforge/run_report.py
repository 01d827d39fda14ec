"""The top-level report of `ezo run`: every number read from the stage outputs, never typed in."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from ezoforge.records import write_json, write_text


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def figure_uri(fig) -> str:
    """A matplotlib figure as an embedded PNG data URI (the HTML stays one self-contained file)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _eval_summary(rep: dict) -> dict:
    keys = ("n_tasks", "n_scored", "n_failed", "mean_grade", "ci95", "chrf", "accuracy", "perplexity", "model",
            "judge", "partial")
    return {k: rep.get(k) for k in keys if k in rep}


def collect(workdir: Path, plan: list[str], timings: dict) -> dict[str, Any]:
    stats = {step: _read(workdir / folder / "stats.json") for step, folder in
             (("curate", "curate"), ("synth", "synth"), ("train", "train"))}
    base = _eval_summary(_read(workdir / "eval-base" / "report.json"))
    tuned = _eval_summary(_read(workdir / "eval-tuned" / "report.json"))
    curate, synth, train = stats["curate"], stats["synth"], stats["train"]
    report: dict[str, Any] = {
        "workdir": str(workdir),
        "curate": {k: curate.get(k) for k in ("docs_in", "docs_out", "bytes_in", "bytes_out", "removed_by_filter")},
        "synth": {k: synth.get(k) for k in ("documents", "requests", "pairs", "parse_rate", "pairs_per_doc",
                                            "tokens_per_s")},
        "train": {k: train.get(k) for k in ("steps", "train_loss_first", "train_loss_last", "eval_loss",
                                            "tokens_per_s", "packing_efficiency", "qlora")},
        "eval": {"base": base, "tuned": tuned},
        "stages": {},
    }
    if base.get("perplexity") and tuned.get("perplexity"):
        report["eval"]["perplexity_change_pct"] = round(100 * (tuned["perplexity"] / base["perplexity"] - 1), 2)
        report["eval"]["tuned_beats_base_perplexity"] = tuned["perplexity"] < base["perplexity"]
    summaries = {
        "curate": f"{curate.get('docs_in')} docs in → {curate.get('docs_out')} kept",
        "synth": f"{synth.get('pairs')} pairs, parse rate {synth.get('parse_rate')}",
        "train": f"loss {train.get('train_loss_first')} → {train.get('train_loss_last')}",
        "merge": "standalone model written",
        "eval-base": f"ppl {base.get('perplexity')}, chrF {base.get('chrf')}, grade {base.get('mean_grade')}",
        "eval-tuned": f"ppl {tuned.get('perplexity')}, chrF {tuned.get('chrf')}, grade {tuned.get('mean_grade')}",
        "export": "model card" + "".join(f" + {g['file']}" for g in _read(workdir / "export" / "stats.json")
                                         .get("gguf", [])),
    }
    for step in plan:
        report["stages"][step] = {"seconds": timings.get(step, {}).get("seconds"), "summary": summaries[step]}
    return report


def _charts(workdir: Path, report: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = []
    removed = report["curate"].get("removed_by_filter") or {}
    if removed:
        fig, ax = plt.subplots(figsize=(6, 0.35 * len(removed) + 1))
        names = sorted(removed, key=removed.get)
        ax.barh(names, [removed[n] for n in names], color="#c0504d")
        ax.set_xlabel("documents removed")
        charts.append(("What each curation filter removed", figure_uri(fig)))
    metrics = [m for m in _metrics(workdir / "train" / "metrics.jsonl") if m.get("loss") is not None]
    if metrics:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label="train loss")
        evals = [m for m in _metrics(workdir / "train" / "metrics.jsonl") if m.get("eval_loss") is not None]
        if evals:
            ax.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.legend()
        charts.append(("Training loss", figure_uri(fig)))
    base, tuned = report["eval"]["base"], report["eval"]["tuned"]
    pairs = [(k, base.get(k), tuned.get(k)) for k in ("perplexity", "chrf", "mean_grade", "accuracy")
             if base.get(k) is not None and tuned.get(k) is not None]
    if pairs:
        fig, axes = plt.subplots(1, len(pairs), figsize=(2.6 * len(pairs), 2.8))
        for ax, (name, b, t) in zip(axes if len(pairs) > 1 else [axes], pairs):
            ax.bar(["base", "tuned"], [b, t], color=["#8c8c8c", "#4f81bd"])
            ax.set_title(name)
        charts.append(("Base vs tuned", figure_uri(fig)))
    return charts


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v, ensure_ascii=False))}</td></tr>"
                    for k, v in rows)
    return f"<table>{cells}</table>"


def write_run_report(workdir: Path, plan: list[str], timings: dict) -> dict:
    report = collect(workdir, plan, timings)
    report["paths"] = {"json": str(workdir / "report.json"), "html": str(workdir / "report.html")}
    write_json(workdir / "report.json", report)
    base, tuned = report["eval"]["base"], report["eval"]["tuned"]
    keys = sorted(set(base) | set(tuned))
    versus = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(base.get(k), ensure_ascii=False))}"
                     f"</td><td>{html.escape(json.dumps(tuned.get(k), ensure_ascii=False))}</td></tr>" for k in keys)
    change = report["eval"].get("perplexity_change_pct")
    verdict = "" if change is None else (
        f"<p><b>Held-out perplexity: tuned {tuned['perplexity']:.2f} vs base {base['perplexity']:.2f} "
        f"({change:+.1f}%).</b></p>")
    body = [
        "<h1>ezoforge run report</h1>", f"<p>workdir: <code>{html.escape(str(workdir))}</code></p>",
        "<h2>Stages</h2>", _table([(s, info) for s, info in report["stages"].items()]),
        "<h2>Curation</h2>", _table(list(report["curate"].items())),
        "<h2>Synthesis</h2>", _table(list(report["synth"].items())),
        "<h2>Training</h2>", _table(list(report["train"].items())),
        "<h2>Base vs tuned</h2>", verdict,
        f"<table><tr><th></th><th>base</th><th>tuned</th></tr>{versus}</table>",
    ]
    for title, uri in _charts(workdir, report):
        body.append(f"<h3>{html.escape(title)}</h3><img src='{uri}' alt='{html.escape(title)}'>")
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:14px}th{background:#f4f4f4}")
    write_text(workdir / "report.html", f"<!doctype html><html lang='ja'><meta charset='utf-8'><title>ezoforge run"
                                        f"</title><style>{style}</style><body>{''.join(body)}</body></html>\n")
    return report
