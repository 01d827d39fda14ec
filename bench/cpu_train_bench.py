"""A LoRA training step on a CPU: float32 throughout (what `train.cpu_autocast: false` does) against matmuls in
bfloat16 under autocast (`auto` on a CPU with bf16 instructions), with LoRA dropout 0.05 (the default) and without
(the demo recipe). The bundled SmolLM2-135M, LoRA r=16 on all linear layers, no checkpointing, one run.

    .venv/bin/python bench/cpu_train_bench.py --batch 2 --length 512 --steps 3

Prints seconds per step for each (median of the timed steps, after one warm-up step) and the ratio of the float32,
dropout-0.05 step to the demo's step (autocast, no dropout) last.
"""
from __future__ import annotations

import argparse

import torch
from qlora_cpu_bench import seconds_per_step  # bench/ is on the path of a script run from it

from ezoforge.train.settings import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 instructions: {native}, "
          f"batch {a.batch} x {a.length} tokens")
    runs = {}
    for autocast, dropout in [(False, 0.05), (True, 0.05), (False, 0.0), (True, 0.0)]:
        cfg = TrainConfig(qlora=False, lora_dropout=dropout, gradient_checkpointing=False)
        runs[autocast, dropout] = s = seconds_per_step(cfg, a.batch, a.length, a.steps, autocast)
        name = "bf16 autocast" if autocast else "float32      "
        print(f"{name}, lora_dropout {dropout:.2f}: {s:.2f} s/step ({a.batch * a.length / s:.0f} tokens/s)")
    print(f"float32 with dropout / autocast without (the demo's step): {runs[False, 0.05] / runs[True, 0.0]:.2f}x")


if __name__ == "__main__":
    main()
