"""`ezo plan`'s figures for reinforce: the trainer, the generation engine and a local judge on one card."""
from __future__ import annotations

import importlib.util

from ezoforge.sizing import (CUDA_OVERHEAD_GIB, EVAL_PROMPT_TOKENS, GIB, PROCESS_RAM_GIB, VLLM_OVERHEAD_GIB,
                             decode_tokens_per_s, largest_shard, weight_bytes)


def estimate(plan, step: str) -> dict:
    """GRPO on one card, three things at once: the trainer (policy and reference as two adapters on one base;
    a step's batch_size x num_generations sequences), the generation engine (vLLM colocated, holding
    reinforce.vllm_gpu_memory_utilization of the card, or transformers' KV cache beside the training weights)
    and a `local` judge (its weights and verdicts' KV cache)."""
    r, c, t, shape = plan.recipe, plan.recipe.reinforce, plan.recipe.train, plan.shape
    prompt = plan.vol.passage_tokens + EVAL_PROMPT_TOKENS  # the passage, the instruction and the system prompt
    sequences = c.batch_size * c.num_generations
    length = int(prompt + c.max_completion_length)
    qlora = t.uses_qlora("cuda")  # bitsandbytes trains on the planned card
    scheme = "nf4" if qlora else plan.base_dtype()
    activations = shape.layers * sequences * length * shape.hidden * 2 * (1 if t.gradient_checkpointing else 18)
    trainer = (weight_bytes(shape, scheme) + plan.lora_params() * (16 + 4) + activations) / GIB + CUDA_OVERHEAD_GIB
    vllm = c.uses_vllm("cuda", importlib.util.find_spec("vllm") is not None)  # installed: as on this machine
    engine_fits = True
    if vllm:
        # vLLM's own copy of the weights (16-bit), its overhead and one step's sequences of KV cache must fit in
        # its share of the card.
        engine = c.vllm_gpu_memory_utilization * plan.card.memory_gib
        need = (weight_bytes(shape, plan.base_dtype()) + sequences * length * shape.kv_bytes_per_token) / GIB + \
            VLLM_OVERHEAD_GIB
        engine_fits = need <= engine
        words = (f"vLLM colocated: reinforce.vllm_gpu_memory_utilization {c.vllm_gpu_memory_utilization:g} of the "
                 f"card ({engine:.1f} GiB), which must hold its weights, overhead and {sequences} sequences of KV "
                 f"cache ({need:.1f} GiB)")
    else:
        engine = sequences * length * shape.kv_bytes_per_token / GIB
        words = (f"transformers: the KV cache of {sequences} sequences x {length:,} tokens ({engine:.1f} GiB) "
                 "beside the training weights")
    judge = plan.local_judge_gib() if "judge" in c.active else 0.0
    # + the scores before and after: num_generations completions per held-out prompt and per as many trained ones
    completions = c.max_steps * sequences * c.grad_accum + 4 * c.held_out * c.num_generations
    decode = decode_tokens_per_s(plan.card, shape, weight_bytes(shape, scheme), sequences)
    tps = plan.train_tokens_per_s()
    train_tokens = c.max_steps * sequences * c.grad_accum * length
    judge_calls = completions * r.eval.judgments if "judge" in c.active else 0
    shard, _ = largest_shard(r.model.name, shape)
    plan.sources["reinforce"] = (
        f"model: trainer {trainer:.1f} GiB ({scheme} weights + two adapters, {sequences} sequences of {length:,} "
        f"tokens) + generation {engine:.1f} GiB ({words}) + judge {judge:.1f} GiB "
        f"({'local: ' + str(r.eval.judge_model) if judge else 'none here'}); "
        f"{completions:,} completions decoded, {judge_calls:,} judge calls (their time is the judge's); training "
        "at train's tokens/s x 3/4 for the reference's forward pass")
    return {"gpu_gib": trainer + engine + judge, "ram_gib": PROCESS_RAM_GIB + shard / GIB,
            "fits_gpu": engine_fits and trainer + engine + judge <= plan.card.memory_gib,
            "disk_gib": plan.lora_params() * 4 * (1 + c.keep_checkpoints * 3) / GIB,
            "hours": (completions * c.max_completion_length / decode + train_tokens * 4 / 3 / tps) / 3600,
            "completions": int(completions), "judge_calls": int(judge_calls), "train_tokens": int(train_tokens),
            "gpu_parts_gib": {"trainer": round(trainer, 2), "generation": round(engine, 2), "judge": round(judge, 2)}}
