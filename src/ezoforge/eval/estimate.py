"""`ezo plan`'s figures for the eval steps (answers through eval.backend, the model loaded here for likelihood
tasks and a local judge) and pairwise (a local judge's weights)."""
from __future__ import annotations

from ezoforge.eval.tasks import TASK_TYPES, parse_spec
from ezoforge.infer.registry import backend_class
from ezoforge.sizing import (CUDA_OVERHEAD_GIB, EVAL_PROMPT_TOKENS, GIB, PROCESS_RAM_GIB, in_process_gib,
                             in_process_words, largest_shard, model_shape, weight_bytes)


def task_type(spec: str):
    """The eval task type a task spec names (`KIND` or `KIND:FILE`; an unknown one is refused, naming it): what it
    declares is what the plan counts."""
    return TASK_TYPES[parse_spec(spec)[0]]


def answers(plan, step: str) -> dict:
    """Answers from eval.backend; choice/perplexity tasks and a local judge load the model here (after a vLLM
    engine has given the card back), with model.quantize."""
    r, e = plan.recipe, plan.recipe.eval
    kind = backend_class(e.backend)
    quantize = plan.eval_quantize()
    scheme = plan.base_dtype() if quantize == "none" else quantize
    # The tuned model is the merged folder (a llama.cpp engine writes it once as a GGUF); the base as it is. The
    # adapter rides on the base for eval-sft, and for eval-tuned without a merge or where the base is quantized
    # (eval.run.scores_adapter: the quantized base + the adapter is what was trained).
    adapter = step == "eval-sft" or (step == "eval-tuned" and ("merge" not in r.stages or quantize != "none"))
    spec = r.model.name if step == "eval-base" or adapter else plan.merged
    answer_tokens = EVAL_PROMPT_TOKENS + e.generation.max_new_tokens
    job = plan.engine_job(kind, spec, e.context_tokens or min(plan.shape.context, 8192), answer_tokens,
                          e.generation.batch_size, scheme, adapter)
    engine = kind.estimate(e, job)
    local_judge = e.judge_url == "local"
    judge = 0.0
    if local_judge and e.judge_model != r.model.name:
        judge_shape = model_shape(e.judge_model)
        judge = (weight_bytes(judge_shape, plan.base_dtype()) + job.batch *
                 (EVAL_PROMPT_TOKENS * 3 + e.judge_max_tokens) * judge_shape.kv_bytes_per_token) / GIB
    here = f"the model here with model.quantize {r.model.quantize} (-> {quantize}): "
    figures = [] if kind.in_process else [{"gpu_gib": engine.gpu_gib, "fits_gpu": engine.fits_gpu}]
    sources = [] if kind.in_process else ["answers: " + engine.source]
    loads_here = kind.in_process or local_judge or any(task_type(t).scoring.loads_model for t in e.tasks)
    if loads_here:
        figures.append({"gpu_gib": in_process_gib(job) + judge, "fits_gpu": None})
        sources.append(here + (engine.source if kind.in_process else in_process_words(job)) +
                       (" + the local judge" if judge else ""))
    plan.sources["eval"] = "model: " + "; then ".join(sources) + \
        "; hours count the answers only (a judge's time is its server's)"
    peak = max((f["gpu_gib"] for f in figures), default=0.0)
    fits = all(plan.card.memory_gib >= f["gpu_gib"] if f["fits_gpu"] is None else f["fits_gpu"] for f in figures)
    shard, _ = largest_shard(r.model.name, plan.shape)
    rate = engine.tokens_per_s
    return {"gpu_gib": peak, "fits_gpu": fits,
            "ram_gib": max(engine.ram_gib, PROCESS_RAM_GIB + shard / GIB if loads_here else 0.0),
            "disk_gib": (plan.download(step, r.model.name, plan.shape) + engine.disk_bytes) / GIB,
            "hours": None if rate is None else plan.vol.eval_out / rate / 3600, "tokens_per_s": rate}


def pairwise(plan, step: str) -> dict:
    """No answers: the judge reads two evals' answers, two prompts per pair. A local judge is loaded here; a served
    one's time and memory are its server's."""
    plan.sources["pairwise"] = "model: a local judge's weights + KV cache of eval.concurrency verdicts"
    if plan.recipe.eval.judge_url != "local":
        return {"gpu_gib": 0.0, "ram_gib": PROCESS_RAM_GIB, "disk_gib": 0.0, "hours": None}
    return {"gpu_gib": plan.local_judge_gib() + CUDA_OVERHEAD_GIB, "ram_gib": PROCESS_RAM_GIB, "disk_gib": 0.0,
            "hours": None}
