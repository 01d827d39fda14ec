"""Output tokens/s of ezo synth's transformers backend against plain `model.generate` (dynamic cache), side by side.

A Llama-3.1-8B-shaped model with random weights (bf16, CUDA), the real Llama 3 tokenizer, 64 Japanese prompts of
128 tokens, 256 new tokens, greedy. Our path (TransformersBackend with static_cache: a preallocated KV cache and
a compiled, CUDA-graphed decode step) is warmed up once per batch shape first; the warm-up (compile) time is
printed apart. Then our path is swept over batch sizes. The ratio at the headline batch is printed last.

`--cpu-backends`: the two CPU backends synth and eval answer through, on the same Japanese chat prompts (the
package's demo tasks under the EZO system prompt), greedy: transformers (float32) and llamacpp (the f16 GGUF our
exporter writes of the same model, made once into the cache), each one request at a time and batched. The ratio
llamacpp / transformers, batched, is printed last.

    python bench/generate_bench.py              # on the GPU
    python bench/generate_bench.py --tiny       # a 2-layer shape on CPU: checks the script, measures nothing
    python bench/generate_bench.py --cpu-backends [--model MERGED_DIR] [--threads N]   # the bundled model by default
    python bench/generate_bench.py --cpu-backends --prompts 1 --new-tokens 4 --batch 2   # checks the script
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PARAGRAPHS = ROOT.parent / "shared" / "data" / "jglue" / "jsquad" / "wikipedia_paragraphs.jsonl"
TASKS = ROOT / "src" / "ezoforge" / "data" / "tasks" / "demo-tasks.jsonl"


def llama3_tokenizer():
    import llama_models.llama3.tokenizer as lt
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    meta = lt.Tokenizer.get_instance()
    backend = TikTokenConverter(vocab_file=str(Path(lt.__file__).parent / "tokenizer.model"), pattern=meta.pat_str,
                                extra_special_tokens=meta.special_tokens).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")


def random_model(tiny: bool, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8)
    if tiny:
        shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
    config = LlamaConfig(vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                         bos_token_id=128000, eos_token_id=128009, tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: an 8B model in float32 would need 32 GB first
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def prompts_of(tokenizer, n: int, length: int, source: Path = PARAGRAPHS) -> list[str]:
    """Japanese Wikipedia paragraphs cut to `length` tokens (repeated when there are fewer than n)."""
    texts = [json.loads(line)["text"] for line in source.read_text(encoding="utf-8").splitlines()[:n]]
    ids = tokenizer("".join(texts), add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[(i * length) % (len(ids) - length):][:length]) for i in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_generate(model, tokenizer, texts, batch: int, new_tokens: int, device) -> tuple[int, float]:
    """The baseline: `model.generate` with its default dynamic cache, left-padded batches."""
    tokenizer.padding_side = "left"
    total, start = 0, time.perf_counter()
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i: i + batch], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        total += int((new != tokenizer.pad_token_id).sum())
    sync(device)
    return total, time.perf_counter() - start


def ours(backend, texts, new_tokens: int, device) -> tuple[int, float]:
    from ezoforge.infer.backends import Request

    return answered(backend, [Request(str(i), t, prompt=t) for i, t in enumerate(texts)], new_tokens, device)


def answered(backend, reqs, new_tokens: int, device=torch.device("cpu")) -> tuple[int, float]:
    """(tokens generated, seconds) for a backend's greedy answers to the requests."""
    from ezoforge.infer.generate import Sampling

    outs = {}
    start = time.perf_counter()
    backend.run(reqs, Sampling(max_new_tokens=new_tokens), lambda i, o: outs.__setitem__(i, o))
    sync(device)
    return sum(o.tokens_out for o in outs.values()), time.perf_counter() - start


def cpu_backends(args) -> None:
    from ezoforge.config import DEFAULT_SYSTEM_PROMPT
    from ezoforge.eval.settings import EvalConfig
    from ezoforge.infer.backends import Request, Target
    from ezoforge.infer.generate import build_messages
    from ezoforge.infer.registry import backend_class
    from ezoforge.models import load, resolve

    spec = args.model or resolve("bundled:smollm2-135m-instruct")  # a safetensors folder: llamacpp runs our export
    tasks = [json.loads(line)["input"] for line in TASKS.read_text(encoding="utf-8").splitlines()]
    reqs = [Request(str(i), "", messages=tuple((m["role"], m["content"]) for m in
                                               build_messages(tasks[i % len(tasks)], DEFAULT_SYSTEM_PROMPT)))
            for i in range(args.prompts)]
    loaded = load(spec, device="cpu")
    print(f"{spec} · {args.prompts} prompts · {args.new_tokens} new tokens · torch threads {torch.get_num_threads()} "
          f"· llamacpp threads {args.threads}")
    results: dict = {"model": str(spec), "prompts": args.prompts, "new_tokens": args.new_tokens}
    # llama.cpp first: once torch has computed in a process, its idle thread pool slows llama.cpp's threads there.
    for name in ("llamacpp", "transformers"):
        for batch in (1, args.batch):
            section = EvalConfig.model_validate({"backend": name, "generation": {"batch_size": batch}, **(
                {"llamacpp": {"threads": args.threads}} if name == "llamacpp" else {})})
            backend = backend_class(name).build(section, Target(spec, load=lambda: loaded))
            answered(backend, reqs[:1], 2)  # loads the engine (and writes the GGUF the first time)
            n, s = answered(backend, reqs, args.new_tokens)
            backend.close()
            results[f"{name} batch {batch}"] = {"tokens": n, "seconds": round(s, 2), "tok_s": round(n / s, 1)}
            print(f"{name:<12} batch {batch:>3}: {n / s:9.1f} tok/s  ({n} tokens, {s:.1f} s)")
    for batch in (1, args.batch):
        results[f"ratio batch {batch}"] = round(results[f"llamacpp batch {batch}"]["tok_s"] /
                                               results[f"transformers batch {batch}"]["tok_s"], 2)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"ratio one at a time (llamacpp / transformers): {results['ratio batch 1']:.2f}x")
    print(f"ratio at batch {args.batch} (llamacpp / transformers): {results[f'ratio batch {args.batch}']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="2-layer model on CPU, few tokens: checks the script only")
    ap.add_argument("--prompts", type=int, help="default 64 (--cpu-backends 16)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, help="default 256 (--cpu-backends 64)")
    ap.add_argument("--batch", type=int, help="headline batch size (both paths; default 64, --cpu-backends 8)")
    ap.add_argument("--sweep", default="16,32,64,128,256", help="batch sizes for our path ('' to skip)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--assets", type=Path, help="tokenizer and prompts from bench/gpu_assets.py pack (no llama-models "
                    "or ../shared there)")
    ap.add_argument("--cpu-backends", action="store_true", help="transformers against llamacpp on the CPU (below)")
    ap.add_argument("--model", help="--cpu-backends: a merged model folder (default: the bundled model)")
    ap.add_argument("--threads", default="auto", help="--cpu-backends: llamacpp.threads (auto: os.cpu_count())")
    args = ap.parse_args()
    if args.cpu_backends:
        args.batch, args.prompts, args.new_tokens = args.batch or 8, args.prompts or 16, args.new_tokens or 64
        args.threads = args.threads if args.threads == "auto" else int(args.threads)
        return cpu_backends(args)
    args.batch, args.prompts, args.new_tokens = args.batch or 64, args.prompts or 64, args.new_tokens or 256
    if args.tiny:
        args.prompts, args.prompt_tokens, args.new_tokens, args.batch, args.sweep = 4, 32, 8, 4, "2"

    import transformers

    from ezoforge.infer.backends import TransformersBackend
    from ezoforge.models import Loaded

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"device {card} · torch {torch.__version__} · transformers {transformers.__version__} · {dtype}")
    source = args.assets / "paragraphs.jsonl" if args.assets else PARAGRAPHS
    if args.assets:
        from gpu_assets import tokenizer as assets_tokenizer

        tokenizer = assets_tokenizer(args.assets)
    else:
        tokenizer = llama3_tokenizer()
    model = random_model(args.tiny, device, dtype)
    texts = prompts_of(tokenizer, max([args.prompts, *[int(b) for b in args.sweep.split(",") if b]]), args.prompt_tokens,
                       source)
    loaded = Loaded(model, tokenizer, "random-llama", None, device, 0.0)

    def our_backend(batch: int):
        # static_cache is what `ezo synth` turns on for CUDA; on CPU (--tiny) it runs uncompiled, to check the path.
        return TransformersBackend(tokenizer, 4096, lambda: loaded, batch, static_cache=True)

    results = {"device": card, "torch": torch.__version__, "transformers": transformers.__version__,
               "prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}

    def save() -> None:  # after every measurement: a run stopped at its time cap keeps what it finished
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    head = texts[: args.prompts]
    plain_generate(model, tokenizer, head[: args.batch][:2], args.batch, 4, device)  # CUDA/kernel warm-up
    n, s = plain_generate(model, tokenizer, head, args.batch, args.new_tokens, device)
    results["plain"] = {"batch": args.batch, "tokens": n, "seconds": round(s, 2), "tok_s": round(n / s, 1)}
    save()
    print(f"plain generate  batch {args.batch:>3}: {n / s:9.1f} tok/s  ({n} tokens, {s:.1f} s)")

    sweep = results["ours"] = {}
    for batch in sorted({args.batch, *[int(b) for b in args.sweep.split(",") if b]}):
        backend = our_backend(batch)
        batch_texts = texts[: max(args.prompts, batch)]
        warm = time.perf_counter()
        ours(backend, batch_texts[:batch], args.new_tokens, device)  # compiles the shapes this batch size uses
        warm = time.perf_counter() - warm
        n, s = ours(backend, batch_texts, args.new_tokens, device)
        sweep[batch] = {"prompts": len(batch_texts), "tokens": n, "seconds": round(s, 2), "tok_s": round(n / s, 1),
                        "warmup_s": round(warm, 1)}
        save()
        print(f"ezo synth path  batch {batch:>3}: {n / s:9.1f} tok/s  ({n} tokens, {s:.1f} s; warm-up {warm:.0f} s)")
    ratio = sweep[args.batch]["tok_s"] / results["plain"]["tok_s"]
    results["ratio"] = round(ratio, 2)
    save()
    print(f"ratio at batch {args.batch} (ours / plain generate): {ratio:.2f}x")


if __name__ == "__main__":
    main()
