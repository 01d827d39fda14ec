"""Why `train.qlora: auto` picks LoRA on a CPU: seconds per training step of the bundled SmolLM2-135M with a 4-bit NF4
base (bitsandbytes' CPU path) against a float32 base, the same LoRA r=16 on all linear layers, same batch, in one run.

    .venv/bin/python bench/qlora_cpu_bench.py --batch 4 --length 512 --steps 3

Prints seconds per step for each (median of the timed steps, after one warm-up step) and the ratio QLoRA / LoRA last.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ezoforge.train.model import lora_config, load_base
from ezoforge.train.settings import TrainConfig


def seconds_per_step(cfg: TrainConfig, batch: int, length: int, steps: int, autocast: bool = False) -> float:
    """Median seconds of a LoRA step on the bundled model (after one warm-up step), `autocast`: bf16 matmuls."""
    from peft import get_peft_model

    qlora = cfg.qlora is True
    model = get_peft_model(load_base("bundled:smollm2-135m-instruct", cfg, torch.device("cpu"), qlora), lora_config(cfg))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(100, 40000, (batch, length), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch} x {a.length} tokens")
    lora = seconds_per_step(TrainConfig(qlora=False), a.batch, a.length, a.steps)
    print(f"LoRA, float32 base: {lora:.2f} s/step")
    qlora = seconds_per_step(TrainConfig(qlora=True), a.batch, a.length, a.steps)
    print(f"QLoRA, NF4 base:    {qlora:.2f} s/step")
    print(f"QLoRA / LoRA seconds per step: {qlora / lora:.2f}x")


if __name__ == "__main__":
    main()
