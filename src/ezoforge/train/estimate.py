"""`ezo plan`'s figures for train (the SFT: weights, adapter and optimizer, activations, FSDP over several cards,
measured steps where they exist) and merge (the streaming merge on the CPU)."""
from __future__ import annotations

from dataclasses import dataclass

from ezoforge.sizing import (CUDA_OVERHEAD_GIB, GIB, PROCESS_RAM_GIB, TEMPLATE_TOKENS, TRAIN_FLOPS_PER_PARAM, TRAIN_MFU,
                             known_shape, largest_shard, weight_bytes)

@dataclass(frozen=True)
class Measured:
    """A training step measured on one card: `rows` x `length` tokens, gradient checkpointing, QLoRA r=16."""

    rows: int
    length: int
    tokens_per_s: float
    peak_gib: float
    source: str


REFERENCE = ("HF+peft QLoRA reference measured on one H100 (bench/RESULTS.md: reference figures), an upper bound "
             "for ezo train's memory; ezo train's own step is not measured on a GPU yet (bench/RESULTS.md)")
# (shape, card) -> the measured step. bench/train_bench.py's figures replace these once measured on such a card.
MEASURED = {
    ("llama-3.1-8b", "h100"): Measured(4, 2048, 5851, 21.7, REFERENCE),
    ("llama-3.1-70b", "h100"): Measured(1, 4096, 850, 50.2, REFERENCE),
}

FSDP_SCALING = 0.9  # share of N cards' throughput FSDP keeps (its gathers and reduce-scatters): assumed, not measured
# A held-out token's time beside a trained one's: a checkpointed step runs the forward, its recompute and the
# backward; an evaluation the forward only.
EVAL_COST = 1 / 3
# Host memory per token of the tokenized data set (training and held-out rows): Python int lists of ids and labels
# (before and after TRL's packing) and the Arrow table the trainer builds from them (int32 ids, int64 labels).
# Measured: 188 bytes/token of peak RSS growth over 2.6 M tokens of 1.5–2k-token examples through train.data.pack
# and Dataset.from_list, on the 2-core bench CPU.
TOKENIZED_BYTES_PER_TOKEN = 190

# bench/merge_bench.py (bench/RESULTS.md): the streaming merge made the Llama-3.1-8B shape (8.03 B params, bf16 in
# and out) in 250.8 s on the 2-core bench CPU under load. It is CPU-bound (each LoRA target's W + B·A in float32,
# cast, written), so its rate is counted in parameters per second.
MERGE_PARAMS_PER_S = 8.03e9 / 250.8


def train(plan, step: str) -> dict:
    r, t = plan.recipe, plan.recipe.train
    shape, card = plan.shape, plan.card
    qlora = t.uses_qlora("cuda")  # bitsandbytes trains on the planned card
    scheme = "nf4" if qlora else plan.base_dtype()
    weights = weight_bytes(shape, scheme)  # NF4 keeps embeddings and head 16-bit
    activations = shape.layers * t.batch_size * t.max_length * shape.hidden * 2 * \
        (1 if t.gradient_checkpointing else 18)
    # No logits: the loss goes through TRL's fused, chunked LM head (train/run.py), never tokens x vocab.
    # FSDP over several cards: each holds 1/N of the weights, adapters and AdamW state, plus the one layer it
    # gathers whole to compute and the next it prefetches; activations are its own batch's.
    n = plan.gpus
    gathered = 2 * weights / shape.layers if n > 1 else 0.0
    gpu = ((weights + plan.lora_params() * 16) / n + gathered + activations) / GIB + CUDA_OVERHEAD_GIB
    tps = n * FSDP_SCALING ** (n > 1) * card.bf16_tflops * 1e12 * TRAIN_MFU / (TRAIN_FLOPS_PER_PARAM * shape.params)
    plan.sources["train_tokens_per_s"] = (f"model: {TRAIN_FLOPS_PER_PARAM} FLOPs per parameter and token at "
                                          f"{TRAIN_MFU:.0%} of the card's bf16 peak (calibrated on the 8B H100 "
                                          "reference, 5,851 tok/s)")
    plan.sources["train_memory_gib"] = (f"model: {scheme} weights (16-bit embeddings and head), LoRA + AdamW, "
                                        "hidden states (checkpointed or not), no logits (fused LM head)")
    if n > 1:
        plan.sources["train_memory_gib"] += (f"; FSDP over {n} cards: weights, adapters and AdamW state sharded "
                                             "1/N, one layer gathered whole and one prefetched")
        plan.sources["train_tokens_per_s"] += f"; x {n} cards at {FSDP_SCALING:.0%} scaling (not measured)"
    measured = MEASURED.get((known_shape(r.model.name), plan.card_name)) if n == 1 else None
    if measured and qlora and t.gradient_checkpointing and (t.batch_size, t.max_length) == (measured.rows,
                                                                                                measured.length):
        tps, gpu = measured.tokens_per_s, measured.peak_gib
        plan.sources["train_tokens_per_s"] = plan.sources["train_memory_gib"] = (
            f"measured: {measured.rows} x {measured.length} tokens, {measured.source}")
    # Checkpointed layers' inputs wait in pinned host memory (offload_activations, on with CUDA checkpointing).
    offload = t.offloads_activations("cuda")
    host_activations = shape.layers * t.batch_size * t.max_length * shape.hidden * 2 if offload else 0
    shard, _ = largest_shard(r.model.name, shape)
    adapter = plan.lora_params() * 4
    checkpoints = t.keep_checkpoints * plan.lora_params() * 12  # fp32 adapter + AdamW moments
    plan.tps = tps
    v = plan.vol
    tokenized = v.data_tokens * TOKENIZED_BYTES_PER_TOKEN
    plan.sources["train_hours"] = (
        f"model: {v.train_tokens:,.0f} tokens trained (train.group_pairs {t.group_pairs}: "
        f"{'one conversation per passage, split at max_length' if t.group_pairs == 'passage' else 'one per pair'}"
        f"; each holds the passage, each pair its synth answer's token cap shared evenly and "
        f"{2 * TEMPLATE_TOKENS} template tokens, the system prompt once) + {v.evals} held-out evaluations "
        f"(before step 1, every {t.eval_every} of {v.steps} steps, after the last) of train.eval_fraction "
        f"{t.eval_fraction:g} of the conversations: {v.held_out_tokens:,.0f} tokens at {EVAL_COST:.2f} of a "
        "trained token's compute (forward only: no recompute, no backward)")
    plan.sources["train_ram_gib"] = (
        f"model: the largest base shard, offloaded checkpoint inputs, and the tokenized rows: "
        f"{v.data_tokens:,.0f} tokens x {TOKENIZED_BYTES_PER_TOKEN} bytes (measured: Python int lists and the "
        "Arrow table of ids and labels)")
    return {"gpu_gib": gpu, "ram_gib": PROCESS_RAM_GIB + (shard + host_activations + tokenized) / GIB,
            "disk_gib": (adapter + checkpoints + plan.download("train", r.model.name, shape)) / GIB,
            "hours": (v.train_tokens + v.held_out_tokens * EVAL_COST) / tps / 3600, "tokens_per_s": tps}


def merge(plan, step: str) -> dict:
    # Tensor by tensor from the base's shards (train/merge.py): one shard mapped, the adapter, and the largest
    # tensor being made: a LoRA target's W, B·A and their sum in float32, or a copied embedding.
    shard, basis = largest_shard(plan.recipe.model.name, plan.shape)
    tensor = max(3 * 4 * max(a * b for a, b in plan.shape.linear_dims), 2 * plan.shape.vocab * plan.shape.hidden)
    ram = PROCESS_RAM_GIB + (shard + plan.lora_params() * 4 + tensor) / GIB
    written = plan.shape.params * plan.merged_bytes()
    plan.sources["merge"] = (f"model: the streaming merge holds the largest base shard ({shard / 1e9:.1f} GB, "
                             f"{basis}), the adapter and the largest tensor it makes; GPU unused")
    plan.sources["merge_hours"] = (f"measured: {MERGE_PARAMS_PER_S / 1e6:.0f} M params/s, bench/merge_bench.py "
                                   "on the Llama-3.1-8B shape, 2-core CPU under load (bench/RESULTS.md); "
                                   "CPU-bound, so a host with more free cores is likely faster")
    return {"gpu_gib": 0.0, "ram_gib": ram, "disk_gib": written / GIB,
            "hours": plan.shape.params / MERGE_PARAMS_PER_S / 3600}
