"""`ezo plan`'s figures for synth: its backend's share (`Backend.estimate`), the engines the cards hold, the
answers written."""
from __future__ import annotations

from ezoforge.infer.registry import backend_class
from ezoforge.sizing import CHARS_PER_TOKEN_JA, COMPRESSION, GIB, PROMPT_TOKENS, model_shape, prefill_tokens_per_s


def synth_context(recipe) -> int:
    """The synth model's context as synth uses it (vLLM's max_model_len): synth.context_tokens or the model's."""
    s = recipe.synth
    if backend_class(s.backend).served:
        return s.context_tokens or 4096
    return min(model_shape(s.model or recipe.model.name).context, s.context_tokens or 1 << 30)


def estimate(plan, step: str) -> dict:
    r, s = plan.recipe, plan.recipe.synth
    disk_out = plan.vol.synth_out * CHARS_PER_TOKEN_JA * 3 * (1 + 1 / COMPRESSION)  # stored answers + pairs
    kind, spec = backend_class(s.backend), s.model or r.model.name
    seq_tokens = plan.vol.passage_tokens + PROMPT_TOKENS[s.mode] + s.generation.max_new_tokens
    job = plan.engine_job(kind, spec, synth_context(r), seq_tokens, s.generation.batch_size, plan.base_dtype())
    engine = kind.estimate(s, job)
    plan.sources["synth"] = "model: " + engine.source
    disk = disk_out + engine.disk_bytes + (plan.download("synth", spec, job.shape) if job.shape else 0.0)
    figures = {"gpu_gib": engine.gpu_gib, "disk_gib": disk / GIB}
    if engine.fits_gpu is not None:
        figures["fits_gpu"] = engine.fits_gpu
    if engine.tokens_per_s is None:  # a server's or the CPU's speed
        return {**figures, "ram_gib": engine.ram_gib, "hours": None}
    rate, ram = engine.tokens_per_s, engine.ram_gib
    engines = max(1, plan.gpus // engine.cards)  # synth.workers tasks, each on its cards (executor gpus_per_task)
    if plan.gpus > 1:
        rate *= engines
        ram *= engines
        plan.sources["synth"] += (f"; {engines} engines of {engine.cards} card(s) on the {plan.gpus} cards, one "
                                  f"per synth task (synth.workers {engines}, synth.executor.gpus_per_task "
                                  f"{engine.cards})")
    prefill = engines * engine.cards * prefill_tokens_per_s(plan.card, job.shape)
    return {**figures, "ram_gib": ram, "hours": (plan.vol.synth_out / rate + plan.vol.synth_in / prefill) / 3600,
            "tokens_per_s": rate}  # decoding, what `ezo run --smoke` compares synth's stats with
