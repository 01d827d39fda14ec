"""`ezo eval`: answer, judge and score one model into DIR; `compare` several DIRs.

Every model output and judge reply is stored in a request cache the moment it arrives, keyed by what
determines it, so a rerun computes only what is missing: with everything cached it loads no model, sends
nothing to the judge and writes the identical report.
"""
from __future__ import annotations

import functools
import json
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from rich.progress import Progress

from ezoforge.cache import RequestCache, request_key
from ezoforge.config import ModelConfig, Recipe, output_settings, to_plain
from ezoforge.errors import EzoError, RecordError
from ezoforge.eval import eval_report, metrics
from ezoforge.eval.judge_prompt import PROMPT_VERSION
from ezoforge.eval.judge_client import Judge
from ezoforge.eval.tasks import OPEN_KINDS, Suite, load_suites
from ezoforge.models import cache_root, check_model, check_spec, model_identity
from ezoforge.records import read_jsonl, write_json, write_jsonl, write_text
from ezoforge.stage import Stage, input_fingerprints



def _cached(cache: RequestCache, keys: list[str], compute: Callable[[list[int]], list], batch: int, label: str,
            counts: Counter) -> list:
    """The value for each key: read from the cache, or computed `batch` at a time and stored as each batch ends."""
    values = [cache.get(k) for k in keys]
    todo = [i for i, v in enumerate(values) if v is None]
    counts[f"{label}_cached"] += len(keys) - len(todo)
    counts[f"{label}_computed"] += len(todo)
    if todo:
        with Progress() as progress:
            bar = progress.add_task(label, total=len(keys), completed=len(keys) - len(todo))
            for start in range(0, len(todo), batch):
                chunk = todo[start: start + batch]
                for i, value in zip(chunk, compute(chunk)):
                    cache.put(keys[i], value)
                    values[i] = value
                progress.advance(bar, len(chunk))
    return values


class _Models:
    """The answering model and generator, loaded on first use only (a fully cached rerun never loads them)."""

    def __init__(self, m: ModelConfig, adapter: Path | None):
        self.m, self.adapter = m, adapter

    @functools.cached_property
    def loaded(self):
        from ezoforge.models import load

        return load(self.m.name, self.adapter, self.m.device, self.m.dtype, self.m.chat_template)

    @functools.cached_property
    def generator(self):
        from ezoforge.infer.generate import Generator

        return Generator(self.loaded)

    def judge_model(self, spec: str):
        """The local judge's model: the answering one when it is the same plain model, else its own load."""
        if spec == self.m.name and self.adapter is None:
            return self.loaded
        from ezoforge.models import load

        return load(spec, None, self.m.device, self.m.dtype)


def _answers(suites: list[Suite], recipe: Recipe, fp: str, models: _Models, cache: RequestCache,
             counts: Counter) -> list[dict]:
    from ezoforge.infer.generate import Sampling, build_messages

    g = recipe.eval.generation
    tasks = [t for s in suites if s.kind in OPEN_KINDS for t in s.items]
    messages = [build_messages(t.prompt, recipe.model.system_prompt) for t in tasks]
    sampling = Sampling.from_config(g)
    keys = [request_key(kind="answer", model=fp, messages=msg, sampling=asdict(sampling)) for msg in messages]

    def compute(idx: list[int]) -> list[dict]:
        outs = models.generator.complete([messages[i] for i in idx], sampling)
        return [{"text": c.text, "finish_reason": c.finish_reason, "completion_tokens": c.completion_tokens}
                for c in outs]

    values = _cached(cache, keys, compute, g.batch_size, "answers", counts)
    refs = [(i, t) for i, t in enumerate(tasks) if t.reference is not None]
    per = metrics.chrf([values[i]["text"] for i, _ in refs], [t.reference for _, t in refs])[1] if refs else []
    chrf_of = {i: score for (i, _), score in zip(refs, per)}
    return [{"task_id": t.id, "prompt": t.prompt, "reference": t.reference, "answer": v["text"],
             "finish_reason": v["finish_reason"], "completion_tokens": v["completion_tokens"], "chrf": chrf_of.get(i)}
            for i, (t, v) in enumerate(zip(tasks, values))]


def _predictions(suite: Suite, recipe: Recipe, fp: str, models: _Models, cache: RequestCache,
                 counts: Counter) -> list[dict]:
    from ezoforge.eval.likelihood import choice_logprobs, jcqa_prompt, pick

    system, items = recipe.model.system_prompt, suite.items
    keys = [request_key(kind="choices", model=fp, system=system, prompt=jcqa_prompt(it), choices=it.choices)
            for it in items]
    values = _cached(cache, keys, lambda idx: [{"logprobs": lp} for lp in choice_logprobs(
        models.generator, system, [items[i] for i in idx])], recipe.eval.generation.batch_size, "choices", counts)
    return [{"id": it.id, "pred": pick(v["logprobs"], it.choices, recipe.eval.jcqa_normalization), "label": it.label,
             "pred_per_char": pick(v["logprobs"], it.choices, "per_char"), "pred_sum": pick(v["logprobs"], it.choices, "sum"),
             "logprobs": v["logprobs"]} for it, v in zip(items, values)]


def _passages(suite: Suite, recipe: Recipe, fp: str, models: _Models, cache: RequestCache,
              counts: Counter) -> list[dict]:
    from ezoforge.eval.likelihood import passage_nll

    window, items = recipe.eval.ppl_window, suite.items
    keys = [request_key(kind="ppl", model=fp, text=p.text, window=window) for p in items]
    values = _cached(cache, keys, lambda idx: [{"nll": nll, "tokens": n} for nll, n in passage_nll(
        models.loaded, [items[i].text for i in idx], window)], recipe.eval.generation.batch_size, "passages", counts)
    return [{"id": p.id, **v} for p, v in zip(items, values)]


def _accuracy(preds: list[dict], field: str) -> float | None:
    return metrics.rounded(sum(p[field] == p["label"] for p in preds) / len(preds)) if preds else None


def _report(recipe: Recipe, adapter: Path | None, fp: str, rows: list[dict], judgements: list[dict],
            preds: list[dict], passages: list[dict]) -> dict:
    cfg, m = recipe.eval, recipe.model
    judged = cfg.judge_model is not None and bool(rows)
    boot = (cfg.bootstrap_samples, cfg.bootstrap_seed)

    def open_figures(subset: list[dict]) -> dict:
        ids = {r["task_id"] for r in subset}
        refs = [r for r in subset if r["reference"] is not None]
        score = metrics.chrf([r["answer"] for r in refs], [r["reference"] for r in refs])[0] if refs else None
        graded = [j for j in judgements if j["task_id"] in ids]
        summary = eval_report.grade_summary(graded, len(subset), judged, cfg.allow_partial, *boot)
        return {"n_tasks": len(subset), **summary, "chrf": metrics.rounded(score)}

    tokens = sum(p["tokens"] for p in passages)
    if passages and not tokens:
        raise RecordError("ppl: every paragraph is a single token; nothing to predict")
    kinds = sorted({r["task_id"].split("/", 1)[0] for r in rows})
    return {
        "model": {"name": _model_name(recipe, adapter), "spec": m.name,
                  "adapter": str(adapter) if adapter else None, "fingerprint": fp},
        "judge": {"model": cfg.judge_model, "prompt_version": PROMPT_VERSION} if judged else None,
        "prompt_version": PROMPT_VERSION if judged else None,
        "tasks": cfg.tasks,
        **open_figures(rows),
        "chrf_signature": metrics.chrf_signature(),
        "accuracy": _accuracy(preds, "pred"), "accuracy_normalization": cfg.jcqa_normalization if preds else None,
        "accuracy_by_normalization": {"sum": _accuracy(preds, "pred_sum"), "per_char": _accuracy(preds, "pred_per_char")}
        if preds else None,
        "n_choice_items": len(preds),
        "perplexity": metrics.rounded(metrics.perplexity(sum(p["nll"] for p in passages), tokens)) if passages else None,
        "ppl_tokens": tokens, "n_passages": len(passages),
        "by_suite": {k: open_figures([r for r in rows if r["task_id"].startswith(k + "/")]) for k in kinds}
        if len(kinds) > 1 else None,
        "generation": to_plain(cfg.generation), "system_prompt": m.system_prompt,
        "bootstrap": {"samples": cfg.bootstrap_samples, "seed": cfg.bootstrap_seed},
    }


def run(recipe: Recipe, out: Path, adapter: Path | None = None, force: bool = False) -> dict:
    """Evaluate recipe.model (plus `adapter`) on recipe.eval.tasks into `out`; returns the report.

    Raises EzoError after writing everything when judgements failed (unless allowed as partial)."""
    cfg, out = recipe.eval, Path(out)
    suites = load_suites(cfg.tasks, cfg.limit)
    m = recipe.model
    check_model(m.name, adapter, m.device, m.chat_template)  # a bad model fails before the folder is claimed
    if cfg.judge_url == "local":
        check_spec(cfg.judge_model)
    fp = model_identity(m.name, adapter, m.dtype, m.device, m.chat_template)
    stage = Stage("eval", out, {
        "model": {"spec": recipe.model.name, "adapter": str(adapter) if adapter else None, "fingerprint": fp,
                  "system_prompt": recipe.model.system_prompt},
        "inputs": input_fingerprints([s.path for s in suites if s.path is not None]),
        "eval": output_settings(cfg), "prompt_version": PROMPT_VERSION},
        inputs=[s.path for s in suites if s.path is not None])
    if stage.start(force) is not None:
        return json.loads((out / "report.json").read_text(encoding="utf-8"))
    with stage.claimed():
        return _evaluate(recipe, out, adapter, stage, suites, fp)


def _evaluate(recipe: Recipe, out: Path, adapter: Path | None, stage: Stage, suites: list[Suite], fp: str) -> dict:
    cfg = recipe.eval
    started, counts = time.perf_counter(), Counter()
    models = _Models(recipe.model, adapter)
    cache = RequestCache(cfg.cache or cache_root() / "eval-requests.sqlite")
    with ExitStack() as stack:
        stack.callback(cache.close)
        judge = Judge(cfg, cache, stack, lambda: models.judge_model(cfg.judge_model)) if cfg.judge_model else None
        rows = _answers(suites, recipe, fp, models, cache, counts)
        preds = [p for s in suites if s.kind == "jcqa" for p in _predictions(s, recipe, fp, models, cache, counts)]
        passages = [p for s in suites if s.kind == "ppl" for p in _passages(s, recipe, fp, models, cache, counts)]
        judging = time.perf_counter()
        judgements = judge.judge_all([t for s in suites if s.kind in OPEN_KINDS for t in s.items],
                                     [r["answer"] for r in rows], _model_name(recipe, adapter)) \
            if judge and rows else []
        if judge:
            counts.update(judge_sent=judge.sent, judge_cached=judge.cached,
                          judge_seconds=round(time.perf_counter() - judging, 1))
    report = _report(recipe, adapter, fp, rows, judgements, preds, passages)
    if rows:
        write_jsonl(out / "answers.jsonl", rows)
    if judgements:
        write_jsonl(out / "judgements.jsonl", judgements)
    if preds:
        write_jsonl(out / "predictions.jsonl", preds)
    write_json(out / "report.json", report)
    write_text(out / "report.html", eval_report.run_html(report, rows, judgements))
    stats = {**counts, "model_loaded": "loaded" in vars(models), "seconds": round(time.perf_counter() - started, 1)}
    if report["status"] == "failed":
        write_json(out / "stats.json", stats)  # no DONE: a rerun resumes and retries what failed
        first = next(j["error"] for j in judgements if j["error"])
        advice = "rerun to retry them" + ("" if report["n_scored"] == 0 else ", or pass --allow-partial")
        raise EzoError(f"{report['n_failed']} of {report['n_tasks']} judgements failed, so there is no mean grade "
                       f"(first: {first}; all in {out / 'judgements.jsonl'}); {advice}")
    stage.finish(stats)
    return report


def _model_name(recipe: Recipe, adapter: Path | None) -> str:
    return recipe.model.name if adapter is None else f"{recipe.model.name}+{Path(adapter).name}"


# ---------------------------------------------------------------- compare

def _load_run(folder: Path) -> tuple[dict, dict[str, int]]:
    path = folder / "report.json"
    if not path.is_file():
        raise EzoError(f"{folder}: no report.json (not an `ezo eval` output folder)")
    report = json.loads(path.read_text(encoding="utf-8"))
    graded = folder / "judgements.jsonl"
    grades = {j["task_id"]: j["grade"] for _, j in read_jsonl(graded) if j.get("grade") is not None} \
        if graded.exists() else {}
    return report, grades


def compare(dirs: list[Path], out: Path | None = None) -> dict:
    """Runs side by side; each later run's grades are paired with the first run's on the tasks both graded."""
    if len(dirs) < 2:
        raise EzoError("compare needs at least two eval folders")
    loaded = [(Path(d), *_load_run(Path(d))) for d in dirs]
    names = [d.name for d, _, _ in loaded]
    labels = names if len(set(names)) == len(names) else [str(d) for d, _, _ in loaded]
    (_, base, base_grades), notes, runs = loaded[0], [], []
    for label, (folder, report, grades) in zip(labels, loaded):
        judge = report["judge"] and f"{report['judge']['model']} / {report['judge']['prompt_version']}"
        row = {"label": label, "dir": str(folder), "model": report["model"]["name"], "judge": judge,
               **{k: report.get(k) for k in ("status", "n_tasks", "n_scored", "n_failed", "mean_grade", "ci95",
                                             "chrf", "accuracy", "perplexity")}, "diff": None}
        if runs:
            shared = sorted(set(base_grades) & set(grades))
            if judge != runs[0]["judge"]:
                notes.append(f"{label}: judged by {judge}, the baseline by {runs[0]['judge']}: grades not paired")
            elif not shared:
                notes.append(f"{label}: no task graded in both this run and the baseline")
            else:
                d = metrics.paired_bootstrap([base_grades[t] for t in shared], [grades[t] for t in shared],
                                             base["bootstrap"]["samples"], base["bootstrap"]["seed"])
                row["diff"] = {**d, "diff": metrics.rounded(d["diff"]), "ci95": [metrics.rounded(x) for x in d["ci95"]],
                               "p_not_better": metrics.rounded(d["p_not_better"])}
        if report.get("status") in ("failed", "partial"):
            notes.append(f"{label}: {report['n_failed']} judgement(s) failed ({report['status']})")
        runs.append(row)
    result = {"baseline": labels[0], "runs": runs, "notes": notes}
    if out is not None:
        write_json(Path(out) / "compare.json", result)
        write_text(Path(out) / "compare.html", eval_report.compare_html(result))
    return result
