"""`ezo eval`: answer, judge and score one model into DIR (compare.py puts several side by side).

Every model output and judge reply is stored in a request cache the moment it arrives, keyed by what
determines it, so a rerun computes only what is missing: with everything cached it loads no model, sends
nothing to the judge and writes the identical report.
"""
from __future__ import annotations

import functools
import json
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path

from ezoforge.cache import RequestCache, cached, request_key
from ezoforge.config import EvalConfig, ModelConfig, Recipe, output_settings, to_plain
from ezoforge.errors import ConfigError, EzoError, RecordError
from ezoforge.eval import anchors, contamination, eval_report, metrics
from ezoforge.eval.judge_client import PROTOCOLS, Judge, Unit, kind_of
from ezoforge.eval.mt_bench import needs_reference
from ezoforge.eval.tasks import OPEN_KINDS, OpenTask, Suite, load_suites
from ezoforge.models import cache_root, check_model, check_spec, model_identity
from ezoforge.records import write_json, write_jsonl, write_text
from ezoforge.stage import Stage, input_fingerprints



class _Models:
    """The answering engine (eval.backend, one of synth's backends) and the local model, each made on first use
    (a fully cached rerun loads neither). Choice and perplexity scores and a local judge need a model in this
    process; a vLLM engine gives the card back before one loads."""

    def __init__(self, m: ModelConfig, adapter: Path | None, cfg: EvalConfig):
        self.m, self.adapter, self.cfg = m, adapter, cfg
        # Another engine is set up now, so a bad setting (no vllm, an unset key variable) fails before any work.
        self.engine = None if cfg.backend == "transformers" else self._engine()

    def _engine(self):
        from ezoforge.infer.backends import OpenAIBackend, VLLMBackend

        cfg, m = self.cfg, self.m
        if self.adapter is not None:
            raise ConfigError(f"eval.backend {cfg.backend} answers with a whole model, not base + adapter "
                              f"({self.adapter}): merge it first (`ezo merge` or the recipe's merge stage)")
        if cfg.backend == "openai":  # whole conversations go out: nothing to render or count here
            return OpenAIBackend(cfg.base_url, m.name, cfg.api_key_env, cfg.timeout, cfg.max_retries, cfg.concurrency,
                                 tokenizer=None, context_length=0)
        from ezoforge.models import load_tokenizer, spec_context_length

        context = cfg.context_tokens or min(spec_context_length(m.name), 8192)
        return VLLMBackend(load_tokenizer(m.name, m.chat_template), context, m.name, m.dtype, cfg.generation.seed,
                           cfg.vllm)

    def answer_identity(self, fp: str) -> str:
        """What answer cache keys name as the model: `fp` for this process's model, with the engine otherwise."""
        if self.engine is None:
            return fp
        where = {"base_url": self.cfg.base_url} if self.cfg.backend == "openai" else output_settings(self.cfg.vllm)
        return request_key(model=fp, backend=self.cfg.backend, **where)[:16]

    @functools.cached_property
    def loaded(self):
        from ezoforge.models import load

        self.close()
        return load(self.m.name, self.adapter, self.m.device, self.m.dtype, self.m.chat_template, quantize=self.m.quantize)

    @functools.cached_property
    def generator(self):
        """Answers: `complete(conversations, sampling) -> [Completion]`."""
        if self.engine is not None:
            return self.engine
        from ezoforge.infer.backends import TransformersBackend

        loaded = self.loaded
        return TransformersBackend(loaded.tokenizer, loaded.context_length, lambda: loaded,
                                   self.cfg.generation.batch_size)

    @functools.cached_property
    def scorer(self):
        """The local Generator for log-likelihoods: the answering one when answers are computed here."""
        if self.engine is None:
            return self.generator.generator()
        from ezoforge.infer.generate import Generator

        return Generator(self.loaded)

    def judge_model(self, spec: str):
        """The local judge's model: the answering one when it is the same plain model, else its own load."""
        if spec == self.m.name and self.adapter is None:
            return self.loaded
        from ezoforge.models import load

        self.close()
        return load(spec, None, self.m.device, self.m.dtype)

    def close(self) -> None:
        """Shut down another engine (a vLLM engine holds its share of the card until then)."""
        if self.engine is not None:
            self.engine.close()


def _answers(tasks: list[OpenTask], recipe: Recipe, fp: str, models: _Models, cache: RequestCache,
             counts: Counter) -> list[dict]:
    """One row per task, sample and turn, in that order. A later turn is asked in the conversation that holds
    the sample's own earlier answers, as MT-Bench asks its second turn."""
    from ezoforge.infer.generate import Sampling, build_messages

    g, system, n_samples = recipe.eval.generation, recipe.model.system_prompt, recipe.eval.samples
    convs = {(i, s): build_messages(t.prompt, system) for i, t in enumerate(tasks) for s in range(n_samples)}
    said: dict[tuple[int, int, int], dict] = {}
    for turn in range(1, max((len(t.turns) for t in tasks), default=0) + 1):
        idx = [i for i, t in enumerate(tasks) if len(t.turns) >= turn]
        for s in range(n_samples):
            # A seed per sample index: samples differ from each other, and each is reproducible on its own.
            sampling = replace(Sampling.from_config(g), seed=g.seed + s)
            if turn > 1:
                for i in idx:
                    convs[i, s] = convs[i, s] + [{"role": "assistant", "content": said[i, s, turn - 1]["text"]},
                                                 {"role": "user", "content": tasks[i].turns[turn - 1]}]
            keys = [request_key(kind="answer", model=fp, messages=convs[i, s], sampling=asdict(sampling), sample=s)
                    for i in idx]

            def compute(chosen: list[int], idx=idx, s=s, sampling=sampling) -> list[dict]:
                outs = models.generator.complete([convs[idx[k], s] for k in chosen], sampling)
                return [{"text": c.text, "finish_reason": c.finish_reason, "completion_tokens": c.completion_tokens}
                        for c in outs]

            for i, value in zip(idx, cached(cache, keys, compute, g.batch_size, "answers", counts)):
                said[i, s, turn] = value
    rows = [{"task_id": t.id, "sample": s, "turn": turn, "prompt": t.turns[turn - 1],
             "reference": t.reference if turn == 1 else None, **said[i, s, turn]}
            for i, t in enumerate(tasks) for s in range(n_samples) for turn in range(1, len(t.turns) + 1)]
    refs = [r for r in rows if r["reference"] is not None]
    per = iter(metrics.chrf([r["text"] for r in refs], [r["reference"] for r in refs])[1] if refs else [])
    return [{**{k: v for k, v in r.items() if k != "text"}, "answer": r["text"],
             "chrf": next(per) if r["reference"] is not None else None} for r in rows]


def _units(tasks: list[OpenTask], rows: list[dict], judgments: int) -> list[Unit]:
    """Every verdict to get, in row order: `judgments` of each answer, each seeing the sample's answers so far."""
    by_id, so_far = {t.id: t for t in tasks}, {}
    units = []
    for r in rows:
        answers = so_far.setdefault((r["task_id"], r["sample"]), [])
        answers.append(r["answer"])
        units += [Unit(by_id[r["task_id"]], r["sample"], r["turn"], j, tuple(answers)) for j in range(judgments)]
    return units


def _check_references(suites: list[Suite]) -> None:
    """MT-Bench judges math, reasoning and coding against reference answers: without them it cannot be run."""
    for suite in suites:
        for t in suite.items if suite.kind == "mt-bench-ja" else []:
            if needs_reference(t) and len(t.references) < len(t.turns):
                raise RecordError(f"{suite.path}: question {t.id} ({t.category}) has {len(t.references)} reference "
                                  f"answer(s) for {len(t.turns)} turn(s); MT-Bench's judge compares {t.category} "
                                  "answers with one: set eval.mt_bench_references to a FastChat reference answer "
                                  "file, or give the question a `reference` list")


def _predictions(suite: Suite, recipe: Recipe, fp: str, models: _Models, cache: RequestCache,
                 counts: Counter) -> list[dict]:
    from ezoforge.eval.likelihood import choice_logprobs, jcqa_prompt, pick

    system, items = recipe.model.system_prompt, suite.items
    keys = [request_key(kind="choices", model=fp, system=system, prompt=jcqa_prompt(it), choices=it.choices)
            for it in items]
    values = cached(cache, keys, lambda idx: [{"logprobs": lp} for lp in choice_logprobs(
        models.scorer, system, [items[i] for i in idx])], recipe.eval.generation.batch_size, "choices", counts)
    return [{"id": it.id, "pred": pick(v["logprobs"], it.choices, recipe.eval.jcqa_normalization), "label": it.label,
             "pred_per_char": pick(v["logprobs"], it.choices, "per_char"), "pred_sum": pick(v["logprobs"], it.choices, "sum"),
             "logprobs": v["logprobs"]} for it, v in zip(items, values)]


def _passages(suite: Suite, recipe: Recipe, fp: str, models: _Models, cache: RequestCache,
              counts: Counter) -> list[dict]:
    from ezoforge.eval.likelihood import passage_nll

    window, items = recipe.eval.ppl_window, suite.items
    keys = [request_key(kind="ppl", model=fp, text=p.text, window=window) for p in items]
    values = cached(cache, keys, lambda idx: [{"nll": nll, "tokens": n} for nll, n in passage_nll(
        models.loaded, [items[i].text for i in idx], window)], recipe.eval.generation.batch_size, "passages", counts)
    return [{"id": p.id, **v} for p, v in zip(items, values)]


def _accuracy(preds: list[dict], field: str) -> float | None:
    return metrics.rounded(sum(p[field] == p["label"] for p in preds) / len(preds)) if preds else None


def _judge_section(cfg, kinds: list[str], judgements: list[dict]) -> dict:
    """The judge as asked and as it answered: the `model` each response reported and its system fingerprints."""
    served = sorted({j["judge_served"] for j in judgements if j["judge_served"]})
    prints = sorted({j["system_fingerprint"] for j in judgements if j["system_fingerprint"]})
    notes = ([f"the judge answered as {len(served)} different models: {', '.join(served)}"] if len(served) > 1 else []) \
        + ([f"the judge reported {len(prints)} system fingerprints: {', '.join(prints)}"] if len(prints) > 1 else [])
    return {"model": cfg.judge_model, "url": cfg.judge_url, "served": served, "system_fingerprints": prints,
            "prompt_version": _prompt_versions(kinds), "temperature": cfg.judge_temperature,
            "mixed": len(served) > 1, "notes": notes}


def _prompt_versions(kinds: list[str]) -> str:
    return "+".join(PROTOCOLS[k][0] for k in kinds)


def _mt_bench_figures(tasks: list[OpenTask], judgements: list[dict], boot: tuple[int, int]) -> dict:
    """FastChat's MT-Bench table: the mean by category and by turn (1–10), each a mean over questions."""
    graded = [j for j in judgements if kind_of(j["task_id"]) == "mt-bench-ja"]

    def mean(subset: list[dict]) -> dict:
        per_task = {t: g for t, g in metrics.task_grades(subset).items() if g}
        if not per_task:
            return {"n_tasks": 0, "mean_grade": None, "ci95": None}
        m, ci = metrics.mean_over_tasks(per_task, *boot)
        return {"n_tasks": len(per_task), "mean_grade": metrics.rounded(m), "ci95": [metrics.rounded(x) for x in ci]}

    category = {t.id: t.category for t in tasks}
    return {"by_category": {c: mean([j for j in graded if category[j["task_id"]] == c])
                            for c in sorted({t.category for t in tasks if kind_of(t.id) == "mt-bench-ja"})},
            "by_turn": {str(k): mean([j for j in graded if j["turn"] == k]) for k in (1, 2)}}


def _report(recipe: Recipe, adapter: Path | None, fp: str, tasks: list[OpenTask], rows: list[dict],
            judgements: list[dict], preds: list[dict], passages: list[dict]) -> dict:
    cfg, m = recipe.eval, recipe.model
    judged = cfg.judge_model is not None and bool(rows)
    boot = (cfg.bootstrap_samples, cfg.bootstrap_seed)
    kinds = list(dict.fromkeys(kind_of(t.id) for t in tasks))

    def open_figures(ids: set[str]) -> dict:
        refs = [r for r in rows if r["task_id"] in ids and r["reference"] is not None]
        score = metrics.chrf([r["answer"] for r in refs], [r["reference"] for r in refs])[0] if refs else None
        graded = [j for j in judgements if j["task_id"] in ids]
        scales = {PROTOCOLS[kind_of(t)][1] for t in ids}
        summary = eval_report.grade_summary(graded, len(ids), judged, cfg.allow_partial, *boot,
                                            scales.pop() if len(scales) == 1 else None)
        return {"n_tasks": len(ids), **summary, "chrf": metrics.rounded(score)}

    tokens = sum(p["tokens"] for p in passages)
    if passages and not tokens:
        raise RecordError("ppl: every paragraph is a single token; nothing to predict")
    return {
        "model": {"name": _model_name(recipe, adapter), "spec": m.name,
                  "adapter": str(adapter) if adapter else None, "fingerprint": fp},
        "judge": _judge_section(cfg, kinds, judgements) if judged else None,
        "prompt_version": _prompt_versions(kinds) if judged else None,
        "protocol": {"samples": cfg.samples, "judgments": cfg.judgments, "temperature": cfg.generation.temperature,
                     "judge_temperature": cfg.judge_temperature},
        "tasks": cfg.tasks,
        **open_figures({t.id for t in tasks}),
        "chrf_signature": metrics.chrf_signature(),
        "accuracy": _accuracy(preds, "pred"), "accuracy_normalization": cfg.jcqa_normalization if preds else None,
        "accuracy_by_normalization": {"sum": _accuracy(preds, "pred_sum"), "per_char": _accuracy(preds, "pred_per_char")}
        if preds else None,
        "n_choice_items": len(preds),
        "perplexity": metrics.rounded(metrics.perplexity(sum(p["nll"] for p in passages), tokens)) if passages else None,
        "ppl_tokens": tokens, "n_passages": len(passages),
        "by_suite": {k: open_figures({t.id for t in tasks if kind_of(t.id) == k}) for k in kinds}
        if len(kinds) > 1 else None,
        "mt_bench": _mt_bench_figures(tasks, judgements, boot) if judged and "mt-bench-ja" in kinds else None,
        "per_task": [{"task_id": t, **metrics.task_spread(g)} for t, g in metrics.task_grades(judgements).items() if g],
        "generation": to_plain(cfg.generation), "system_prompt": m.system_prompt,
        "bootstrap": {"samples": cfg.bootstrap_samples, "seed": cfg.bootstrap_seed},
    }


def run(recipe: Recipe, out: Path, adapter: Path | None = None, force: bool = False) -> dict:
    """Evaluate recipe.model (plus `adapter`) on recipe.eval.tasks into `out`; returns the report.

    Raises EzoError after writing everything when judgements failed (unless allowed as partial)."""
    cfg, out = recipe.eval, Path(out)
    suites = load_suites(cfg.tasks, cfg.limit, cfg.mt_bench_references)
    if cfg.judge_model:
        _check_references(suites)
    m = recipe.model
    check_model(m.name, adapter, m.device, m.chat_template, m.quantize)  # a bad model fails before the folder is claimed
    if cfg.judge_url == "local":
        check_spec(cfg.judge_model)
    fp = model_identity(m.name, adapter, m.dtype, m.device, m.chat_template, m.quantize)
    inputs = [s.path for s in suites if s.path is not None] + (
        [cfg.mt_bench_references] if cfg.mt_bench_references and any(s.kind == "mt-bench-ja" for s in suites) else [])
    # A local model and adapter are known by their content (fp), not by where they lie: a moved or copied run
    # folder stays done.
    stage = Stage("eval", out, {
        "model": {"spec": None if Path(m.name).exists() else m.name, "adapter": adapter is not None, "fingerprint": fp,
                  "system_prompt": recipe.model.system_prompt},
        "inputs": input_fingerprints(inputs),
        "eval": output_settings(cfg),
        "prompt_version": _prompt_versions([s.kind for s in suites if s.kind in OPEN_KINDS])},
        inputs=inputs)
    if stage.start(force) is not None:
        return json.loads((out / "report.json").read_text(encoding="utf-8"))
    with stage.claimed():
        return _evaluate(recipe, out, adapter, stage, suites, fp)


def _evaluate(recipe: Recipe, out: Path, adapter: Path | None, stage: Stage, suites: list[Suite], fp: str) -> dict:
    cfg = recipe.eval
    started, counts = time.perf_counter(), Counter()
    models = _Models(recipe.model, adapter, cfg)
    cache = RequestCache(cfg.cache or cache_root() / "eval-requests.sqlite")
    tasks = [t for s in suites if s.kind in OPEN_KINDS for t in s.items]
    # Before anything is answered or judged: under `fail`, a task found in the training data stops the eval here.
    contaminated = contamination.run_check(tasks, recipe.model.name, adapter, cfg.contamination,
                                           cfg.contamination_n, cfg.contamination_threshold)
    with ExitStack() as stack:
        stack.callback(cache.close)
        judge = Judge(cfg, cache, stack, lambda: models.judge_model(cfg.judge_model)) if cfg.judge_model else None
        rows = _answers(tasks, recipe, models.answer_identity(fp), models, cache, counts)
        preds = [p for s in suites if s.kind == "jcqa" for p in _predictions(s, recipe, fp, models, cache, counts)]
        passages = [p for s in suites if s.kind == "ppl" for p in _passages(s, recipe, fp, models, cache, counts)]
        judging = time.perf_counter()
        judgements = judge.judge_all(_units(tasks, rows, cfg.judgments), _model_name(recipe, adapter)) \
            if judge and rows else []
        if judge:
            counts.update(judge_sent=judge.sent, judge_cached=judge.cached,
                          judge_seconds=round(time.perf_counter() - judging, 1))
    report = _report(recipe, adapter, fp, tasks, rows, judgements, preds, passages)
    report.update(contamination=contaminated,
                  anchors=anchors.for_report(report, report["judge"] and {**report["judge"], "url": cfg.judge_url}))
    if rows:
        write_jsonl(out / "answers.jsonl", rows)
    if judgements:
        write_jsonl(out / "judgements.jsonl", judgements)
    if preds:
        write_jsonl(out / "predictions.jsonl", preds)
    write_json(out / "report.json", report)
    write_text(out / "report.html", eval_report.run_html(report, rows, judgements))
    stats = {**counts, "model_loaded": "loaded" in vars(models), "seconds": round(time.perf_counter() - started, 1)}
    stats["contamination"] = contaminated
    if report["judge"]:  # the judge as it answered, and whether its version changed during the eval
        stats.update(judge_served=report["judge"]["served"], judge_fingerprints=report["judge"]["system_fingerprints"],
                     judge_mixed=report["judge"]["mixed"], task_spread=report["task_spread"])
    if report["status"] == "failed":
        write_json(out / "stats.json", stats)  # no DONE: a rerun resumes and retries what failed
        first = next(j["error"] for j in judgements if j["error"])
        advice = "rerun to retry them" + ("" if report["n_scored"] == 0 else ", or pass --allow-partial")
        raise EzoError(f"{report['n_failed']} of {len(judgements)} judgements failed, so there is no mean grade "
                       f"(first: {first}; all in {out / 'judgements.jsonl'}); {advice}")
    stage.finish(stats)
    return report


def _model_name(recipe: Recipe, adapter: Path | None) -> str:
    return recipe.model.name if adapter is None else f"{recipe.model.name}+{Path(adapter).name}"
