"""`ezo plan`: what a recipe will cost before it runs — tokens per stage, GPU memory, hours on a card.

Estimates, not promises: every assumption is printed with the figures, and `sources` says where each one comes
from. Where a training step was measured at the recipe's shape on the chosen card (MEASURED), its tokens/s and peak
memory are used as they are; otherwise a model calibrated on those measurements estimates them.
"""
from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

from ezoforge.config import Recipe


@dataclass(frozen=True)
class Card:
    memory_gib: float
    bf16_tflops: float  # dense peak
    bandwidth_tbs: float


CARDS = {
    "h100": Card(80, 989, 3.35), "h200": Card(141, 989, 4.8), "a100-80gb": Card(80, 312, 2.0),
    "a100-40gb": Card(40, 312, 1.55), "l40s": Card(48, 362, 0.86), "l4": Card(24, 121, 0.3),
    "rtx4090": Card(24, 165, 1.0),
}


@dataclass(frozen=True)
class Shape:
    params: float
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_heads: int
    heads: int

    @property
    def linear_dims(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer in one decoder block (q, k, v, o, gate, up, down)."""
        kv = self.hidden * self.kv_heads // self.heads
        h, i = self.hidden, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


@dataclass(frozen=True)
class Measured:
    """A training step measured on one card: `rows` x `length` tokens, gradient checkpointing, QLoRA r=16."""

    rows: int
    length: int
    tokens_per_s: float
    peak_gib: float
    source: str


REFERENCE = ("HF+peft QLoRA reference measured on one H100 (DEVELOPERS.md), an upper bound for ezo train's memory; "
             "ezo train's own step is not measured on a GPU yet (bench/RESULTS.md)")
# (shape, card) -> the measured step. bench/train_bench.py's figures replace these once measured on such a card.
MEASURED = {
    ("llama-3.1-8b", "h100"): Measured(4, 2048, 5851, 21.7, REFERENCE),
    ("llama-3.1-70b", "h100"): Measured(1, 4096, 850, 50.2, REFERENCE),
}

KNOWN_SHAPES = {  # so a plan works offline for the recipes we ship
    "llama-3.1-8b": Shape(8.03e9, 32, 4096, 14336, 128256, 8, 32),
    "llama-3.1-70b": Shape(70.6e9, 80, 8192, 28672, 128256, 8, 64),
}
# Training FLOPs per token: forward + backward through the frozen weights (input grads) + the recompute that
# gradient checkpointing adds = ~8 N. HF+peft QLoRA on one H100 reached 38% of peak at 8B (5,851 tok/s).
TRAIN_FLOPS_PER_PARAM = 8
TRAIN_MFU = 0.38
DECODE_EFFICIENCY = 0.5  # share of the memory-bandwidth bound a batched engine (vLLM) reaches
DECODE_BATCH = 64
CHARS_PER_TOKEN_JA = 1.1  # Llama 3 tokenizer on Japanese prose (measured on the demo corpus: ~1.0–1.2)


def known_shape(spec: str) -> str | None:
    key = spec.lower().replace("meta-llama-", "llama-").replace("_", "-")
    return next((name for name in KNOWN_SHAPES if name in key), None)


def model_shape(spec: str) -> Shape:
    if known_shape(spec):
        return KNOWN_SHAPES[known_shape(spec)]
    from transformers import AutoConfig

    from ezoforge.models import resolve

    cfg = AutoConfig.from_pretrained(resolve(spec))
    h, i, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    shape = Shape(0, n, h, i, v, kv, cfg.num_attention_heads)
    per_layer = sum(a * b for a, b in shape.linear_dims)
    embeddings = v * h * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)
    return Shape(per_layer * n + embeddings, n, h, i, v, kv, cfg.num_attention_heads)


# Compressed inputs are sized by typical expansion ratios for Japanese text (decompressing a 4 GB dump
# just to plan would take longer than the plan is worth).
EXPANSION = {".bz2": 4.5, ".gz": 3.5, ".parquet": 2.5}


def input_chars(patterns: list[str]) -> int:
    """Approximate characters of text in the curation inputs (UTF-8 Japanese: ~3 bytes a character)."""
    total = 0.0
    for pattern in patterns:
        for name in sorted(glob.glob(pattern)):
            path = Path(name)
            total += path.stat().st_size * EXPANSION.get(path.suffix, 1.0) / 3
    return int(total)


def synth_mix(recipe: Recipe, docs: float) -> dict:
    """The documents synth will draw per source: `synth.mix` as set, else each source in proportion to its
    curated documents, estimated here by the size of its curate inputs (equal shares when none is on disk)."""
    from ezoforge.curate.readers import SOURCES, suffix
    from ezoforge.errors import RecordError

    if recipe.synth.mix:
        shares, basis = dict(recipe.synth.mix), "synth.mix"
    else:
        chars: dict[str, int] = {}
        for pattern in recipe.curate.inputs:
            try:
                source = SOURCES[suffix(pattern)]
            except RecordError:  # a folder: its files' kinds are not known before curation
                source = "other"
            chars[source] = chars.get(source, 0) + input_chars([pattern])
        total = sum(chars.values())
        basis = "input sizes (estimate)" if total else "equal (inputs not on disk)"
        shares = {s: (n / total if total else 1 / len(chars)) for s, n in chars.items()}
    return {"basis": basis, "sources": {s: {"share": round(v, 3), "documents": round(docs * v)}
                                        for s, v in sorted(shares.items())}}


def plan(recipe: Recipe, card_name: str = "h100", docs_kept: float = 0.5) -> dict:
    card = CARDS[card_name]
    shape = model_shape(recipe.model.name)
    qlora = recipe.train.qlora is not False
    t, s = recipe.train, recipe.synth
    chars = input_chars(recipe.curate.inputs)
    curated_tokens = chars * docs_kept / CHARS_PER_TOKEN_JA
    doc_tokens = 1500  # a curated document, capped by the synth passage length
    docs = curated_tokens / doc_tokens
    # Inputs not downloaded yet: a full dump holds far more documents than synth.limit, so the limit binds.
    missing = [p for p in recipe.curate.inputs if not glob.glob(p)]
    if s.limit:
        docs = s.limit if missing else min(docs, s.limit)
    synth_in = docs * (doc_tokens + 600)  # passage + our prompt with its few-shot example
    synth_out = docs * s.generation.max_new_tokens
    pair_tokens = doc_tokens + 300
    train_tokens = (t.max_steps * t.batch_size * t.grad_accum * t.max_length if t.max_steps
                    else docs * s.pairs_per_doc * pair_tokens * (t.epochs or 1))
    weight_bytes = shape.params * (0.5 * 1.03 if qlora else 2)  # nf4 + double-quantized scales, or bf16
    lora_params = t.lora_r * sum(a + b for a, b in shape.linear_dims) * shape.layers
    tokens_per_row = t.max_length
    activations = shape.layers * t.batch_size * tokens_per_row * shape.hidden * 2 * (1 if t.gradient_checkpointing else 18)
    logits = t.batch_size * tokens_per_row * shape.vocab * 4 * 2  # float32 logits and their gradient
    train_mem = (weight_bytes + lora_params * 16 + activations + logits) / 2**30 + 2.0  # + CUDA context, allocator
    train_tps = card.bf16_tflops * 1e12 * TRAIN_MFU / (TRAIN_FLOPS_PER_PARAM * shape.params)
    sources = {"train_tokens_per_s": f"model: {TRAIN_FLOPS_PER_PARAM} FLOPs per parameter and token at {TRAIN_MFU:.0%} "
                                     "of the card's bf16 peak (calibrated on the 8B H100 reference, 5,851 tok/s)",
               "train_memory_gib": "model: NF4 weights, LoRA + AdamW, checkpointed hidden states, fp32 logits",
               "decode_tokens_per_s": f"model: {DECODE_EFFICIENCY:.0%} of the memory-bandwidth bound at batch "
                                      f"{DECODE_BATCH}; not measured"}
    measured = MEASURED.get((known_shape(recipe.model.name), card_name))
    if measured and qlora and t.gradient_checkpointing and (t.batch_size, t.max_length) == (measured.rows,
                                                                                                measured.length):
        train_tps, train_mem = measured.tokens_per_s, measured.peak_gib
        sources["train_tokens_per_s"] = sources["train_memory_gib"] = (
            f"measured: {measured.rows} x {measured.length} tokens, {measured.source}")
    decode_tps = DECODE_BATCH * card.bandwidth_tbs * 1e12 * DECODE_EFFICIENCY / (shape.params * 2)
    n_eval = recipe.eval.limit or 100
    eval_tokens = 2 * n_eval * recipe.eval.generation.max_new_tokens  # base and tuned
    return {
        "model": recipe.model.name, "card": card_name, "params_b": round(shape.params / 1e9, 2),
        "tokens": {"curate_in": int(chars / CHARS_PER_TOKEN_JA), "curate_kept": int(curated_tokens),
                   "synth_in": int(synth_in), "synth_out": int(synth_out), "train": int(train_tokens),
                   "eval_out": int(eval_tokens)},
        "synth_mix": synth_mix(recipe, docs),
        "train_memory_gib": round(train_mem, 1), "fits": train_mem <= card.memory_gib,
        "hours": {"synth": round(synth_out / decode_tps / 3600, 2), "train": round(train_tokens / train_tps / 3600, 2),
                  "eval": round(eval_tokens / decode_tps / 3600, 3)},
        "sources": sources,
        "assumptions": {"docs_kept_fraction": docs_kept, "chars_per_token": CHARS_PER_TOKEN_JA,
                        "train_tokens_per_s": round(train_tps), "decode_tokens_per_s": round(decode_tps),
                        "qlora": qlora, "gradient_checkpointing": t.gradient_checkpointing,
                        **({"inputs_missing": missing, "documents_from": "synth.limit" if s.limit else "none"}
                           if missing else {})},
    }


def print_plan(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ezo plan — {result['model']} ({result['params_b']} B params) on {result['card']}")
    for col in ("stage", "tokens", "hours"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    tok, hours = result["tokens"], result["hours"]
    table.add_row("curate", f"{tok['curate_in']:,} in → ~{tok['curate_kept']:,} kept", "CPU")
    table.add_row("synth", f"{tok['synth_in']:,} in / {tok['synth_out']:,} out", f"{hours['synth']}")
    table.add_row("train", f"{tok['train']:,}", f"{hours['train']}")
    table.add_row("eval", f"{tok['eval_out']:,} out", f"{hours['eval']}")
    console = Console()
    console.print(table)
    fits = "fits" if result["fits"] else "does NOT fit"
    mix = result["synth_mix"]
    console.print("synth draws " + ", ".join(f"{s} {v['share']:.0%} (~{v['documents']:,} documents)"
                                             for s, v in mix["sources"].items()) + f"; shares from {mix['basis']}")
    console.print(f"training peak memory ≈ {result['train_memory_gib']} GiB: {fits} on one {result['card']}")
    console.print(f"assumptions: {json.dumps(result['assumptions'])}")
    for figure, source in result["sources"].items():
        console.print(f"{figure}: {source}", highlight=False)
