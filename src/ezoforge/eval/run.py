"""`ezo eval`: answer, judge and score one model into DIR (compare.py puts several side by side).

Every model output and judge reply is stored in a request cache the moment it arrives, keyed by what
determines it, so a rerun computes only what is missing: with everything cached it loads no model, sends
nothing to the judge and writes the identical report.
"""
from __future__ import annotations

import functools
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from ezoforge.cache import RequestCache, request_key
from ezoforge.completion import Engine
from ezoforge.config import ModelConfig, Recipe, output_settings, to_plain
from ezoforge.errors import ConfigError, EzoError
from ezoforge.eval import anchors, contamination, eval_report
from ezoforge.eval.judge_client import Judge
from ezoforge.eval.settings import EvalConfig
from ezoforge.eval.task_types.base import Context, Scoring, Suite, prompt_versions
from ezoforge.eval.tasks import load_suites, scorings
from ezoforge.infer.engines import choose, identity, in_own_thread, pick_backend
from ezoforge.models import cache_root, check_model, check_spec, model_identity, pick_quantize
from ezoforge.records import read_eval_report, write_json, write_jsonl, write_text
from ezoforge.stage import Stage



class _Models:
    """The answering engine (eval.backend, one of synth's backends) and the local model, each made on first use
    (a fully cached rerun loads neither). Choice and perplexity scores and a local judge need a model in this
    process; a vLLM engine gives the card back before one loads."""

    def __init__(self, m: ModelConfig, adapter: Path | None, cfg: EvalConfig):
        from ezoforge.infer.registry import backend_class

        self.m, self.adapter, self.cfg = m, adapter, cfg
        self.kind = backend_class(cfg.backend)
        # Another engine is set up now, so a bad setting (no vllm, an unset key variable) fails before any work.
        self.engine = None if self.kind.in_process else self._backend()

    def _backend(self):
        from ezoforge.infer.backends import Target

        cfg, m = self.cfg, self.m
        if self.adapter is not None and not self.kind.in_process:
            raise ConfigError(f"eval.backend {cfg.backend} answers with a whole model, not base + adapter "
                              f"({self.adapter}): merge it first (`ezo merge` or the recipe's merge stage)")
        # A local engine's context: eval.context_tokens, else the model's own up to 8192 (answers are short).
        return self.kind.build(cfg, Target(m.name, m.chat_template, m.dtype, load=lambda: self.loaded,
                                           max_context=8192))

    def answer_identity(self, fp: str) -> str:
        """What answer cache keys name as the model: `fp` for this process's model, with the engine otherwise."""
        if self.kind.in_process:
            return fp
        where = {"base_url": self.cfg.base_url} if self.kind.served else {}
        return request_key(model=identity(self.cfg.backend, fp), backend=self.cfg.backend, **where,
                           **self.kind.answer_settings(self.cfg))[:16]

    def default_system(self) -> str:
        """The system message the answering model's chat template puts in by itself; "" for a served model (its
        template is the server's), which then reads an explicit empty one."""
        if self.kind.served:
            return ""
        from ezoforge.models import load_tokenizer
        from ezoforge.turns import default_system

        return default_system(load_tokenizer(self.m.name, self.m.chat_template))

    @functools.cached_property
    def loaded(self):
        from ezoforge.models import load

        self.close()
        return load(self.m.name, self.adapter, self.m.device, self.m.dtype, self.m.chat_template, quantize=self.m.quantize)

    @functools.cached_property
    def generator(self) -> Engine:
        """What answers: the backend, over this process's model where it answers here."""
        return self.engine if self.engine is not None else self._backend()

    @functools.cached_property
    def scorer(self):
        """A Generator for log-likelihoods over this process's model (the answering backend's own model when it
        answers here: one load)."""
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


def _report(scored: list[Scoring], ctx: Context, adapter: Path | None) -> dict:
    """report.json: the model, then each Scoring's header, headline figures and breakdowns in registry order."""
    cfg, m = ctx.recipe.eval, ctx.recipe.model
    # How the scored weights were held: the bitsandbytes quantization of an in-process load, None where another
    # engine loads its own (vLLM, llama.cpp, a server).
    in_process = ctx.models.kind.in_process
    report = {"model": {"name": ctx.model_name, "spec": m.name, "adapter": str(adapter) if adapter else None,
                        "fingerprint": ctx.fp, "backend": cfg.backend,
                        "quantize": pick_quantize(m.name, m.quantize, m.device, m.dtype) if in_process else None}}
    for s in scored:
        report.update(s.header(ctx))
    report.update(protocol={"samples": cfg.samples, "judgments": cfg.judgments,
                            "temperature": cfg.generation.temperature, "judge_temperature": cfg.judge_temperature},
                  tasks=cfg.tasks)
    for s in scored:
        report.update(s.figures(ctx))
    for s in scored:
        report.update(s.breakdowns(ctx))
    report.update(generation=to_plain(cfg.generation), system_prompt=m.system_prompt,
                  bootstrap={"samples": cfg.bootstrap_samples, "seed": cfg.bootstrap_seed})
    return report


def scores_adapter(recipe: Recipe) -> bool:
    """Whether the tuned model is scored as the base plus its adapter rather than the merged model: where eval loads
    the base quantized (model.quantize, or auto's choice). Quantizing the merge again gives NF4(W + ΔW), and a LoRA
    delta is far smaller than an NF4 step, so much of the tuning would round away; the quantized base plus the
    adapter is what was trained, and differs from eval-base by exactly that. Engines that load a whole model of
    their own (vLLM, llama.cpp, a server) score the merge."""
    cfg, m = recipe.eval, recipe.model
    return cfg.backend in ("auto", "transformers") and pick_quantize(m.name, m.quantize, m.device, m.dtype) != "none"


def run(recipe: Recipe, out: Path, adapter: Path | None = None, force: bool = False) -> dict:
    """Evaluate recipe.model (plus `adapter`) on recipe.eval.tasks into `out`; returns the report.

    Raises EzoError after writing everything when judgements failed (unless allowed as partial)."""
    cfg, out = recipe.eval, Path(out)
    suites = load_suites(cfg.tasks, cfg.limit, cfg)
    for suite in suites:
        suite.task_type.check(suite, cfg)
    m = recipe.model
    cfg = pick_backend(cfg, "eval.backend", m.name, adapter, m.device, m.quantize)
    from ezoforge.infer.registry import backend_class

    device = None if backend_class(cfg.backend).own_device else m.device  # vLLM: CUDA is the engine's alone
    check_model(m.name, adapter, device, m.chat_template, m.quantize)  # a bad model fails before the folder is claimed
    if cfg.judge_url == "local":
        check_spec(cfg.judge_model)
        cfg = cfg.model_copy(update={"judge_backend": choose(cfg.judge_backend, "eval.judge_backend", cfg.judge_model)})
    recipe = recipe.model_copy(update={"eval": cfg})  # the engines used, as the folder records them
    fp = model_identity(m.name, adapter, m.dtype, device, m.chat_template, m.quantize)
    inputs = [s.path for s in suites if s.path is not None] + [p for s in suites for p in s.task_type.inputs(cfg)]
    versions = prompt_versions(suites)
    # A local model and adapter are known by their content (fp), not by where they lie: a moved or copied run
    # folder stays done.
    stage = Stage("eval", out, {"eval": output_settings(cfg), "prompt_version": versions},
                  model={"spec": None if Path(m.name).exists() else m.name, "adapter": adapter is not None,
                         "fingerprint": fp, "system_prompt": recipe.model.system_prompt},
                  inputs=inputs)
    if stage.start(force) is not None:
        return read_eval_report(out / "report.json")
    with stage.claimed():
        return _evaluate(recipe, out, adapter, stage, suites, fp)


def _evaluate(recipe: Recipe, out: Path, adapter: Path | None, stage: Stage, suites: list[Suite], fp: str) -> dict:
    cfg = recipe.eval
    started, counts = time.perf_counter(), Counter()
    models = _Models(recipe.model, adapter, cfg)
    cache = RequestCache(cfg.cache or cache_root() / "eval-requests.sqlite")
    scored = scorings(suites)
    # Before anything is answered or judged: under `fail`, a task found in the training data stops the eval here.
    contaminated = contamination.run_check([it for s in scored if s.contaminable for it in s.items],
                                           recipe.model.name, adapter, cfg.contamination, cfg.contamination_n,
                                           cfg.contamination_threshold)
    with ExitStack() as stack:
        stack.callback(cache.close)
        judge = Judge(cfg, cache, stack, lambda: models.judge_model(cfg.judge_model)) if cfg.judge_model else None
        ctx = Context(recipe, fp, _model_name(recipe, adapter), models, cache, counts, judge)
        for s in scored:  # the model's work first, then the judge's (which may run on llama.cpp)
            in_own_thread(functools.partial(s.answer, ctx))
        for s in scored:
            s.grade(ctx)
    report = _report(scored, ctx, adapter)
    report.update(contamination=contaminated,
                  anchors=anchors.for_report(report, report["judge"] and {**report["judge"], "url": cfg.judge_url}))
    files = {name: rows for s in scored for name, rows in s.files().items()}
    for name, rows in files.items():
        if rows:
            write_jsonl(out / name, rows)
    judgements = files.get("judgements.jsonl", [])
    write_json(out / "report.json", report)
    write_text(out / "report.html", eval_report.run_html(report, files.get("answers.jsonl", []), judgements))
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


def summary(folder: Path) -> str:
    """The stage in one sentence, from its finished folder: what `ezo eval` prints and the run report shows."""
    return eval_report.words(read_eval_report(Path(folder) / "report.json"))
