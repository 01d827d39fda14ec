"""`ezo serve` under concurrent clients: aggregate output tokens/s and p50/p95 latency, against the one-lock baseline.

The same model behind the same server (our app, continuous batching) is sent the same chat requests at
concurrency 1 and 16 (and 64 with --gpu) through the OpenAI client. The baseline is what the server did before:
one request at a time under one lock, i.e. plain sequential `generate` (Generator.complete) for the same requests,
each client's latency being its wait plus its own generation. Greedy, `max_tokens` new tokens per request.

With the bundled model and llama-cpp-python installed, the same requests also go to `ezo serve` on the llamacpp
engine (llama.cpp on the model's f16 GGUF, its sequences decoding together), and the last line compares the two
engines at concurrency 16.

    python bench/serve_bench.py                        # bundled SmolLM2-135M on CPU: 16 requests of 32 tokens
    python bench/serve_bench.py --gpu                  # Llama-3.1-8B-shaped random weights, bf16, CUDA, up to 64
    python bench/serve_bench.py --random tiny          # a 2-layer random Llama on CPU: checks the --gpu path only
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

QUESTIONS = ["日本の首都はどこですか？", "富士山について短く説明してください。", "猫と犬の違いを教えてください。",
             "おすすめの朝ごはんは？", "俳句とは何ですか？", "東京から大阪まで新幹線で何時間ですか？",
             "雨の日の過ごし方を三つ挙げてください。", "日本の四季について説明してください。"]
LLAMA3_TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
                   "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
                   "\n\n{% endif %}")


def load(random: str | None):
    from ezoforge.models import Loaded, load as load_spec

    if random is None:
        return load_spec("bundled:smollm2-135m-instruct")
    from generate_bench import llama3_tokenizer, random_model

    device = torch.device("cuda" if random == "8b" else "cpu")
    tokenizer = llama3_tokenizer()
    tokenizer.chat_template = LLAMA3_TEMPLATE
    model = random_model(random == "tiny", device, torch.bfloat16 if random == "8b" else torch.float32)
    return Loaded(model, tokenizer, f"random-{random}", None, device, 0.0)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def figures(name: str, latencies: list[float], tokens: int, wall: float) -> dict:
    return {"run": name, "requests": len(latencies), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 0.95)}


def served(url: str, requests: list[list[dict]], max_tokens: int, concurrency: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)

    def one(messages):
        start = time.perf_counter()
        resp = client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens, temperature=0)
        return time.perf_counter() - start, resp.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, requests))
    wall = time.perf_counter() - start
    return figures(f"ours, concurrency {concurrency}", [r[0] for r in results], sum(r[1] for r in results), wall)


def one_lock(gen, requests: list[list[dict]], max_tokens: int) -> dict:
    """The previous server: every request generated alone, in turn under one lock; all clients arrived at time 0."""
    from ezoforge.infer.generate import Sampling

    latencies, tokens, start = [], 0, time.perf_counter()
    for messages in requests:
        tokens += gen.complete([messages], Sampling(max_tokens))[0].completion_tokens
        latencies.append(time.perf_counter() - start)
    return figures("baseline: one lock (sequential generate)", latencies, tokens,
                   time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="8B-shaped random model on CUDA, concurrency up to 64")
    ap.add_argument("--random", choices=["tiny", "8b"], help="a random-weight Llama instead of the bundled model")
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrent run (at least the concurrency)")
    ap.add_argument("--single-requests", type=int, default=3,
                    help="requests at concurrency 1, and for the baseline (sequential: its tokens/s does not depend "
                         "on how many clients queue)")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    random = "8b" if args.gpu else args.random
    levels = [16, 64] if args.gpu else [16]

    from ezoforge.config import ServeConfig
    from ezoforge.infer.generate import Generator
    from ezoforge.infer.serve import BackgroundServer, create_app

    loaded = load(random)
    gen = Generator(loaded)
    requests = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(max(levels + [args.requests]))]
    print(f"model {loaded.name} on {loaded.device}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.max_tokens} new tokens per request, greedy", flush=True)
    rows = []

    def show(row: dict) -> None:
        if not rows:
            print(f"{'run':<44} {'reqs':>5} {'tokens':>7} {'wall s':>8} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7}")
        rows.append(row)
        print(f"{row['run']:<44} {row['requests']:>5} {row['tokens']:>7} {row['wall_s']:>8.1f} {row['tok_s']:>8.1f} "
              f"{row['p50_s']:>7.1f} {row['p95_s']:>7.1f}", flush=True)

    limits = ServeConfig(max_batch=max(levels), max_queue=max(levels + [args.requests]))

    def serve_all(engine, label: str) -> list[dict]:
        with BackgroundServer(create_app(engine, "bench", max_tokens=args.max_tokens, limits=limits)) as url:
            served(url, requests[:2], 4, 2)  # warm-up
            out = [served(url, requests[: args.single_requests], args.max_tokens, 1)]
            out += [served(url, requests[: max(c, args.requests)], args.max_tokens, c) for c in levels]
        for row in out:
            row["run"] = f"{label}{row['run']}"
            show(row)
        return out

    llama = None
    if random is None and importlib.util.find_spec("llama_cpp") is not None:
        from ezoforge.config import LlamaCppConfig
        from ezoforge.infer.llamacpp import LlamaCppGenerator

        # First: once torch has computed in a process, its idle thread pool slows llama.cpp's threads there (as
        # `ezo serve` on llama.cpp never runs torch). llama.cpp's threads: as many as torch's, the same cores.
        engine = LlamaCppGenerator(loaded.spec, loaded.tokenizer, loaded.context_length,
                                   LlamaCppConfig(threads=torch.get_num_threads()), max(levels))
        llama = serve_all(engine, "llamacpp: ")
        engine.close()
    single, batched, *more = serve_all(gen, "")
    baseline = one_lock(gen, requests[: args.single_requests], args.max_tokens)
    show(baseline)
    if args.gpu:
        print(f"concurrency 64 vs 1: {more[0]['tok_s'] / single['tok_s']:.2f}x aggregate tokens/s")
    print(f"concurrency 16 vs the one-lock baseline: {batched['tok_s'] / baseline['tok_s']:.2f}x tokens/s")
    print(f"concurrency 16 vs 1: {batched['tok_s'] / single['tok_s']:.2f}x aggregate tokens/s")
    if llama:
        print(f"llamacpp vs transformers, concurrency 1: {llama[0]['tok_s'] / single['tok_s']:.2f}x tokens/s")
        print(f"llamacpp vs transformers, concurrency 16: {llama[1]['tok_s'] / batched['tok_s']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
