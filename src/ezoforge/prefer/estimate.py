"""`ezo plan`'s figures for prefer: sampling from the SFT model, the judge's calls, then DPO."""
from __future__ import annotations

from ezoforge.sizing import (CUDA_OVERHEAD_GIB, EVAL_PROMPT_TOKENS, GIB, PROCESS_RAM_GIB, SYNTHESIZER_PAIRS,
                             decode_tokens_per_s, largest_shard, prefill_tokens_per_s, weight_bytes)


def estimate(plan, step: str) -> dict:
    """Answers sampled from the SFT model (base + adapter, transformers), one judge call per candidate and
    judgment, then DPO: policy and reference are two adapters on one base; a pair is two sequences, and the
    reference adds a forward pass to each step's forward and backward (3 forwards' worth)."""
    r, p, t, shape = plan.recipe, plan.recipe.prefer, plan.recipe.train, plan.shape
    pairs_made = plan.vol.requests * (r.synth.pairs_per_doc if r.synth.mode == "prompted" else SYNTHESIZER_PAIRS)
    instructions = min(p.limit, pairs_made) if p.limit else pairs_made
    prompt = plan.vol.passage_tokens + EVAL_PROMPT_TOKENS  # the passage, the instruction and the system prompt
    answers = instructions * p.samples
    judge_calls = instructions * (p.samples + p.include_reference) * r.eval.judgments
    g = p.generation
    quantize = plan.eval_quantize()
    sample_scheme = plan.base_dtype() if quantize == "none" else quantize
    sampling_gpu = (weight_bytes(shape, sample_scheme) + plan.lora_params() * 2 + g.batch_size *
                    (prompt + g.max_new_tokens) * shape.kv_bytes_per_token) / GIB + CUDA_OVERHEAD_GIB
    qlora = t.uses_qlora("cuda")  # bitsandbytes trains on the planned card
    scheme = "nf4" if qlora else plan.base_dtype()
    sequences = 2 * p.batch_size
    activations = shape.layers * sequences * p.max_length * shape.hidden * 2 * \
        (1 if t.gradient_checkpointing else 18)
    # TRL's fused LM head never holds the tokens x vocab logits; the reference adapter adds fp32 LoRA weights.
    dpo_gpu = (weight_bytes(shape, scheme) + plan.lora_params() * (16 + 4) + activations) / GIB + CUDA_OVERHEAD_GIB
    tps = plan.train_tokens_per_s()
    steps_pairs = p.max_steps * p.batch_size * p.grad_accum if p.max_steps else instructions * (p.epochs or 1)
    dpo_tokens = steps_pairs * 2 * p.max_length
    decode = decode_tokens_per_s(plan.card, shape, weight_bytes(shape, sample_scheme), g.batch_size)
    sample_tokens = answers * g.max_new_tokens
    shard, _ = largest_shard(r.model.name, shape)
    plan.sources["prefer"] = (
        f"model: {answers:,.0f} answers ({instructions:,.0f} instructions x prefer.samples {p.samples}) decoded "
        f"in {sample_scheme} at generation.batch_size {g.batch_size}; {judge_calls:,.0f} judge calls (their time is "
        f"the judge's); DPO on at most {instructions:,.0f} pairs (all kept: an upper bound), {scheme} weights + "
        "two adapters, 2 sequences per pair, at train's tokens/s x 3/4 for the reference's forward pass")
    return {"gpu_gib": max(sampling_gpu, dpo_gpu), "ram_gib": PROCESS_RAM_GIB + shard / GIB,
            "disk_gib": (plan.lora_params() * 4 * (1 + p.keep_checkpoints * 3)
                         + (answers + judge_calls) * (g.max_new_tokens + r.eval.judge_max_tokens) * 6) / GIB,
            "hours": (sample_tokens / decode + answers * prompt / prefill_tokens_per_s(plan.card, shape)
                      + dpo_tokens * 4 / 3 / tps) / 3600,
            "sample_tokens": int(sample_tokens), "judge_calls": int(judge_calls), "dpo_tokens": int(dpo_tokens)}
