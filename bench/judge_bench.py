"""The demo's local judge: its requests through `ezo serve`'s decoding loop, one at a time against all at once.

Each of the demo's 14 ELYZA-style tasks is judged with the task's own reference as the answer (~1,400 prompt tokens
each with SmolLM2's tokenizer), under the verdict's JSON schema, greedy, at most 96 new tokens: what `ezo eval`
sends with `--judge-url local` in recipes/demo.yaml. The baseline is the one-lock server (every request alone, in
turn: concurrency 1); the rest send all 14 at once with several `serve.max_prefill_tokens`, the padded prompt
tokens one prefill pass may hold.

    python bench/judge_bench.py                       # budgets 1000000 (one pass), 4096, 2048
    python bench/judge_bench.py --budgets 2048        # one budget
"""
from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import torch

from ezoforge.config import ServeConfig
from ezoforge.eval.judge_prompt import judge_messages, verdict_schema
from ezoforge.eval.tasks import load_suites
from ezoforge.infer.batching import Batcher
from ezoforge.infer.generate import Completion, Generator, Sampling
from ezoforge.models import load

TASKS = Path(__file__).resolve().parents[1] / "src/ezoforge/data/tasks/demo-tasks.jsonl"


def judge(gen: Generator, prompts: list[list[int]], sampling: Sampling, budget: int, together: bool) -> dict:
    batcher = Batcher(gen, ServeConfig(max_batch=16, max_prefill_tokens=budget))
    done, tokens = threading.Semaphore(0), []

    def deliver(event):
        if isinstance(event, (Completion, BaseException)):
            tokens.append(event.completion_tokens if isinstance(event, Completion) else 0)
            done.release()

    start = time.perf_counter()
    for p in prompts:
        batcher.submit(p, sampling, deliver)
        if not together:
            done.acquire()
    if together:
        for _ in prompts:
            done.acquire()
    wall = time.perf_counter() - start
    batcher.close()
    return {"wall_s": wall, "tokens": sum(tokens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=int, nargs="+", default=[1_000_000, 4096, 2048])
    args = ap.parse_args()
    tasks = load_suites([f"elyza100:{TASKS}"], None)[0].items
    gen = Generator(load("bundled:smollm2-135m-instruct"))
    prompts = [gen.encode(gen.prompt_text(judge_messages(t, t.reference or ""))) for t in tasks]
    sampling = Sampling(96, 0.0, json_schema=verdict_schema(40)["json_schema"]["schema"])
    gen.structured  # built once per model; not part of any run's time
    print(f"{len(prompts)} judge requests, prompt tokens {min(map(len, prompts))}-{max(map(len, prompts))}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    print(f"{'run':<48} {'wall s':>8} {'tokens':>7}")
    base = judge(gen, prompts, sampling, ServeConfig().max_prefill_tokens, together=False)
    print(f"{'baseline: one at a time (one-lock server)':<48} {base['wall_s']:>8.1f} {base['tokens']:>7}", flush=True)
    rows = []
    for budget in args.budgets:
        row = judge(gen, prompts, sampling, budget, together=True)
        rows.append((budget, row))
        print(f"{f'all {len(prompts)} at once, max_prefill_tokens {budget}':<48} {row['wall_s']:>8.1f} "
              f"{row['tokens']:>7}", flush=True)
    for budget, row in rows:
        print(f"max_prefill_tokens {budget}: {base['wall_s'] / row['wall_s']:.2f}x the one-at-a-time baseline")


if __name__ == "__main__":
    main()
