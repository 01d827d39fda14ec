"""llama.cpp decoding in a process where torch has computed: torch's work on the main thread (its OpenMP team
stays alive, and libgomp then throttles llama.cpp's barriers) against the same work in a passing thread
(`infer.engines.in_own_thread`, what eval does). Each case runs in a fresh process, one after the other; the
bundled model's f16 GGUF, one sequence: a 300-token prompt, then 64 decoding steps.

    .venv/bin/python bench/llamacpp_after_torch_bench.py [--threads 2]

Prints decoding tokens/s before and after torch's work for each case, and the ratio after (passing thread / main
thread) last.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time


def decode_tokens_per_s(engine) -> float:
    """Prefill a 300-token prompt, then time 64 decoding steps; in a thread of its own, as the batching loop runs
    llama.cpp."""
    result = []

    def run() -> None:
        engine.lib.llama_memory_clear(engine.memory, True)
        engine.feed([(0, 0, [100 + 7 * i for i in range(300)])])
        start = time.perf_counter()
        for i in range(64):
            engine.feed([(0, 300 + i, [500 + i])])
        result.append(64 / (time.perf_counter() - start))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


def child(case: str, threads: int) -> None:
    import torch

    from ezoforge.infer.engines import in_own_thread
    from ezoforge.infer.llamacpp import Engine
    from ezoforge.models import gguf_of, load

    engine = Engine(gguf_of("bundled:smollm2-135m-instruct"), threads, 1024, 512, 2)
    before = decode_tokens_per_s(engine)

    def torch_work() -> None:  # eval's perplexity task in small: the model loaded and run once
        model = load("bundled:smollm2-135m-instruct", None, "cpu", "float32", None, quantize="none").model
        with torch.no_grad():
            model(torch.arange(100, 400)[None])

    in_own_thread(torch_work) if case == "passing thread" else torch_work()
    print(f"{before:.1f} {decode_tokens_per_s(engine):.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.threads)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}  # torch's team as large as llama.cpp's
    after = {}
    for case in ("main thread", "passing thread"):
        out = subprocess.run([sys.executable, __file__, "--child", case, "--threads", str(a.threads)], env=env,
                             check=True, capture_output=True, text=True).stdout.split()
        before, after[case] = float(out[-2]), float(out[-1])
        print(f"torch's work on the {case}: llama.cpp decodes {before:.1f} tokens/s before it, {after[case]:.1f} after")
    print(f"after torch's work, passing thread / main thread: {after['passing thread'] / after['main thread']:.2f}x")


if __name__ == "__main__":
    main()
