"""How fast synth could go on this CPU: its work counted, the engine's rates measured, the bound that follows.

Synth's requests are rebuilt from a curated folder exactly as `ezo synth` builds them (recipe, draw, passages,
prompt ids), so the work is the real one: the prompt tokens llama.cpp must read (the prompts' common start once, the
rest of each prompt), and the tokens it decoded (tokens_out of a synth run's stats.json). Then, in this process:
- llama.cpp's rates on that work (the f16 GGUF synth runs): 8 of the real prompts read together after their shared
  start, then decoded together one token a step, as synth's batch of 8 does;
- float32 GEMM through torch (MKL/oneDNN) at the model's matrix shapes: what a dense kernel at this precision
  reaches on these cores.
The bound adds the time of reading and decoding at those rates, as if every step were full and nothing else ran;
multiply-accumulates (MACs) are counted from the model's config. The ratio of that bound to the baseline's
tokens/s is printed last.

    python bench/synth_ceiling.py CURATED OURS_STATS [BASELINE_STATS] [-c recipes/demo.yaml]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from ezoforge.infer.llamacpp import LlamaCppBackend, common_start
from ezoforge.models import resolve
from ezoforge.stage import input_files
from ezoforge.stages import load_recipe
from ezoforge.synth.mix import draw
from ezoforge.synth.passages import read_docs
from ezoforge.synth.run import build_requests, make_backend

BATCH = 8
DECODE_STEPS = 48


def macs_per_token(config) -> tuple[int, int, int]:
    """Matrix MACs of one token through the layers, of the output head, and of attention per token of context."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    layer = h * (2 * q + 2 * kv) + 3 * h * inter
    return layers * layer, h * config.vocab_size, layers * 2 * q  # attention: q.k and p.v per context token


def attention_macs(per_context: int, start: int, end: int) -> int:
    """Attention MACs of reading positions start..end-1 (each attends to itself and all before it)."""
    return per_context * (end * (end + 1) - start * (start + 1)) // 2


def gemm_rate(hidden: int, inter: int) -> float:
    """torch float32 MACs/s on the MLP's shapes, 512 tokens at a time (best of 5)."""
    x, w = torch.randn(512, hidden), torch.randn(hidden, inter)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            x @ w
        best = min(best, time.perf_counter() - start)
    return 10 * 512 * hidden * inter / best


def engine_rates(engine, batch: list[list[int]]) -> tuple[float, float]:
    """llama.cpp's tokens/s reading `batch` together after their shared start (as synth's first step does), then
    decoding them together."""
    slots = [engine.claim(len(p) + DECODE_STEPS) for p in batch]
    with engine.lock:
        engine.shared = []  # read the shared start again: it is part of the work
        start = time.perf_counter()
        engine.share(batch)
        starts = [engine.start_from_shared(s, p) for s, p in zip(slots, batch)]
        engine.feed([(s, n, p[n:]) for s, n, p in zip(slots, starts, batch)])
        read = len(engine.shared) + sum(len(p) - n for p, n in zip(batch, starts))
        read_rate = read / (time.perf_counter() - start)
        start = time.perf_counter()
        for step in range(DECODE_STEPS):
            engine.feed([(s, len(p) + step, [p[-1]]) for s, p in zip(slots, batch)])
        decode_rate = DECODE_STEPS * len(batch) / (time.perf_counter() - start)
    for s in slots:
        engine.release(s)
    return read_rate, decode_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("curated", type=Path)
    ap.add_argument("ours", type=Path, help="stats.json of our synth run over CURATED (its tokens_out and tokens/s)")
    ap.add_argument("baseline", type=Path, nargs="?", help="stats.json of the baseline's synth run")
    ap.add_argument("-c", "--recipe", default="recipes/demo.yaml")
    args = ap.parse_args()

    recipe = load_recipe(args.recipe)
    recipe = recipe.model_copy(update={"synth": recipe.synth.model_copy(update={"backend": "llamacpp"})})
    cfg, model = recipe.synth, recipe.synth.model or recipe.model.name
    docs = draw(read_docs(input_files([args.curated])), cfg.limit, cfg.mix, cfg.seed, str(args.curated))
    backend = make_backend(recipe, model, static_cache=False)
    assert isinstance(backend, LlamaCppBackend)
    prompts = [backend.prompt_ids(r) for r in build_requests(docs, backend, recipe)]
    ours = json.loads(args.ours.read_text())
    if ours["requests"] != len(prompts):
        raise SystemExit(f"{args.ours}: {ours['requests']} requests, but {len(prompts)} built from {args.curated}")
    shared = min(common_start(prompts[0], p) for p in prompts[1:])
    read = shared + sum(len(p) - shared for p in prompts)
    decoded = ours["tokens_out"]

    config = AutoConfig.from_pretrained(resolve(model))
    layer_macs, head_macs, per_context = macs_per_token(config)
    mean_prompt = sum(map(len, prompts)) / len(prompts)
    read_macs = (layer_macs * read + head_macs * len(prompts) + attention_macs(per_context, 0, shared)
                 + sum(attention_macs(per_context, shared, len(p)) for p in prompts))
    decode_macs = (layer_macs + head_macs) * decoded + per_context * decoded * (mean_prompt + decoded / len(prompts) / 2)
    print(f"synth's work: {len(prompts)} prompts of {mean_prompt:.0f} tokens, {shared} in common: llama.cpp reads "
          f"{read:,} prompt tokens ({read_macs / 1e9:,.0f} GMAC) and decodes {decoded:,} ({decode_macs / 1e9:,.0f} "
          "GMAC)")

    engine = backend.generator().engine
    tries = [engine_rates(engine, prompts[:BATCH]) for _ in range(2)]
    read_rate, decode_rate = (max(rates) for rates in zip(*tries))  # each the better of two
    backend.close()
    gemm = gemm_rate(config.hidden_size, config.intermediate_size)
    read_gmacs, decode_gmacs = read_rate * read_macs / read / 1e9, decode_rate * decode_macs / decoded / 1e9
    print(f"torch float32 GEMM (512 x {config.hidden_size} x {config.intermediate_size}): {gemm / 1e9:.0f} GMAC/s")
    print(f"llama.cpp f16: reading {BATCH} prompts together {read_rate:.0f} tokens/s ({read_gmacs:.0f} GMAC/s, "
          f"{read_gmacs / gemm * 1e9:.0%} of the GEMM's); decoding {BATCH} together {decode_rate:.0f} tokens/s "
          f"({decode_gmacs:.0f} GMAC/s, {decode_gmacs / gemm * 1e9:.0%})")

    at_engine = decoded / (read / read_rate + decoded / decode_rate)
    at_gemm = decoded / ((read_macs + decode_macs) / gemm)
    base = json.loads(args.baseline.read_text())["tokens_per_s"] if args.baseline else None
    print(f"bound at llama.cpp's rates: {at_engine:.1f} tokens/s; every MAC at the GEMM's rate (decoding too, which no "
          f"engine nears with {BATCH} rows): {at_gemm:.1f} tokens/s")
    print(f"ours: {ours['tokens_per_s']:.1f} tokens/s" + (f"; baseline: {base:.1f} tokens/s" if base else ""))
    if base:
        print(f"bound / baseline: {at_engine / base:.2f}x at llama.cpp's rates, {at_gemm / base:.2f}x at the GEMM's; "
              f"ours / baseline: {ours['tokens_per_s'] / base:.2f}x")


if __name__ == "__main__":
    main()
