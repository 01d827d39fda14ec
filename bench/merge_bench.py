"""`ezo merge` (tensor by tensor from the base's safetensors shards) against the peft path it replaced (the base
loaded in float32, PeftModel.merge_and_unload, cast, save_pretrained), on a random-weight Llama.

The base is written tensor by tensor straight to safetensors shards of at most --shard-gb (never a whole model in
memory), in bf16, with Llama 3 shapes; the adapter is a random LoRA (A and B both non-zero) on every linear layer of
every block, saved as `ezo train` saves one, in a DONE-marked train folder. Each merge runs in its own fresh
process, which reports its own peak RSS (imports included, the same for both) and wall seconds. Where the peft path
would need more memory than the machine has available, it is skipped and said so.

    python bench/merge_bench.py                   # Llama-3.2-1B shape, both paths
    python bench/merge_bench.py --shape 8b        # Llama-3.1-8B shape: 16 GB on disk; peft path needs ~48 GB
    python bench/merge_bench.py --shape tiny      # a smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings
    "tiny": (512, 1408, 4, 8, 2, 8192, False),
    "1b": (2048, 8192, 16, 32, 8, 128256, True),  # Llama-3.2-1B
    "3b": (3072, 8192, 28, 24, 8, 128256, True),  # Llama-3.2-3B
    "8b": (4096, 14336, 32, 32, 8, 128256, False),  # Llama-3.1-8B
}
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")


def llama_tensors(shape: str) -> list[tuple[str, list[int]]]:
    """(name, shape) of every tensor a LlamaForCausalLM checkpoint holds, in the order transformers writes them."""
    hidden, inter, layers, heads, kv, vocab, tied = SHAPES[shape]
    head = hidden // heads
    out: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [vocab, hidden])]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", [hidden]), (p + "post_attention_layernorm.weight", [hidden]),
                (p + "self_attn.q_proj.weight", [heads * head, hidden]),
                (p + "self_attn.k_proj.weight", [kv * head, hidden]),
                (p + "self_attn.v_proj.weight", [kv * head, hidden]),
                (p + "self_attn.o_proj.weight", [hidden, heads * head]),
                (p + "mlp.gate_proj.weight", [inter, hidden]), (p + "mlp.up_proj.weight", [inter, hidden]),
                (p + "mlp.down_proj.weight", [hidden, inter])]
    out.append(("model.norm.weight", [hidden]))
    if not tied:
        out.append(("lm_head.weight", [vocab, hidden]))
    return out


def random_tensor(name: str, shape: list[int]) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02)


def build_base(shape: str, folder: Path, shard_bytes: int) -> int:
    """A random bf16 Llama as safetensors shards of at most `shard_bytes`, one tensor in memory at a time."""
    from transformers import LlamaConfig

    from ezoforge.train.merge import INDEX, write_safetensors

    hidden, inter, layers, heads, kv, vocab, tied = SHAPES[shape]
    folder.mkdir(parents=True)
    shards: list[list[tuple[str, torch.dtype, list[int]]]] = [[]]
    size = 0
    for name, dims in llama_tensors(shape):
        nbytes = math.prod(dims) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, torch.bfloat16, dims))
        size += nbytes
    weight_map, total, dims_of = {}, 0, dict(llama_tensors(shape))
    for i, layout in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(folder / file, layout, lambda name: random_tensor(name, dims_of[name]))
        weight_map.update({name: file for name, _, _ in layout})
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=8192,
                rope_theta=500000.0, dtype="bfloat16").save_pretrained(folder)
    return total


def build_train_folder(shape: str, base: Path, out: Path, r: int) -> int:
    """A DONE-marked `ezo train` folder whose adapter is a random LoRA (r, alpha 2r) on every linear layer."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from ezoforge.models import load_tokenizer
    from ezoforge.stage import Stage

    stage = Stage("train", out, {"adapter": {"random_lora_r": r}}, model={"name": str(base)})
    stage.start()
    shapes = dict(llama_tensors(shape))
    weights = {}
    torch.manual_seed(0)
    for i in range(SHAPES[shape][2]):
        for module in LINEAR:
            rows, cols = shapes[f"model.layers.{i}.{module}.weight"]
            key = f"base_model.model.model.layers.{i}.{module}"
            weights[f"{key}.lora_A.weight"] = torch.randn(r, cols) / math.sqrt(cols)
            weights[f"{key}.lora_B.weight"] = torch.randn(rows, r) * 0.01
    (out / "adapter").mkdir()
    save_file(weights, out / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    LoraConfig(r=r, lora_alpha=2 * r, target_modules=[m.split(".")[1] for m in LINEAR],
               task_type="CAUSAL_LM").save_pretrained(out / "adapter")
    # Any tokenizer serves: merging never reads it, both paths copy it.
    load_tokenizer("bundled:smollm2-135m-instruct").save_pretrained(out / "adapter")
    stage.finish({})
    return sum(t.numel() * t.element_size() for t in weights.values())


def merge_ours(train: Path, out: Path, dtype: str) -> None:
    from ezoforge.train.merge import run

    run(train, out, dtype)


def merge_peft(train: Path, out: Path, dtype: str) -> None:
    """What `ezo merge` did before: the whole base in float32, peft's merge, cast, save."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = json.loads((train / "DONE").read_text())["settings"]["model"]["name"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(train / "adapter")).merge_and_unload().to(getattr(torch, dtype))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(train / "adapter").save_pretrained(out)


def measured(path: str, train: Path, out: Path, dtype: str) -> dict:
    """Run one merge in a fresh process; its peak RSS and seconds."""
    proc = subprocess.run([sys.executable, __file__, "--child", path, str(train), str(out), dtype],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{path} merge failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(path: str, train: str, out: str, dtype: str) -> None:
    start = time.perf_counter()
    {"ours": merge_ours, "peft": merge_peft}[path](Path(train), Path(out), dtype)
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def same_result(a: Path, b: Path, names: list[str]) -> float:
    """Largest difference between the two outputs on a few tensors (0 expected: the same float32 sums)."""
    from safetensors import safe_open

    def load(folder: Path, name: str) -> torch.Tensor:
        index = folder / "model.safetensors.index.json"
        file = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
        with safe_open(folder / file, "pt") as f:
            return f.get_tensor(name).float()

    return max((load(a, n) - load(b, n)).abs().max().item() for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="1b")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="largest base shard (GB)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=Path("runs/merge-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the base, adapter and outputs")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    work = args.workdir / args.shape
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    size = build_base(args.shape, work / "base", int(args.shard_gb * 1e9))
    adapter = build_train_folder(args.shape, work / "base", work / "train", args.rank)
    shards = sorted((work / "base").glob("*.safetensors"))
    largest = max(f.stat().st_size for f in shards)
    params = size // 2
    print(f"{args.shape}: {params / 1e9:.2f} B parameters, {size / 1e9:.2f} GB bf16 in {len(shards)} shards "
          f"(largest {largest / 1e9:.2f} GB); LoRA r={args.rank} on every linear layer, {adapter / 1e6:.0f} MB "
          f"float32; built in {time.perf_counter() - start:.0f} s; merge to {args.dtype}")

    ours = measured("ours", work / "train", work / "ours", args.dtype)
    print(f"ours (streamed):                   {ours['seconds']:8.1f} s   peak RSS {ours['peak_rss_gib']:6.2f} GiB")
    # The peft path holds the float32 base and the cast copy at once (the cast of each parameter is made before
    # the old one goes), plus what loading and saving add.
    need = params * (4 + torch.finfo(getattr(torch, args.dtype)).bits // 8)
    if need > 0.9 * available_bytes():
        print(f"peft (float32 base + merge_and_unload): SKIPPED — needs ~{need / 2**30:.1f} GiB, this machine has "
              f"{available_bytes() / 2**30:.1f} GiB available")
        print(f"ours peaks at {ours['peak_rss_gib']:.2f} GiB for a {size / 2**30:.1f} GiB model "
              f"({ours['peak_rss_gib'] / (size / 2**30):.2f}x the model's bf16 size)")
    else:
        peft = measured("peft", work / "train", work / "peft", args.dtype)
        print(f"peft (float32 + merge_and_unload): {peft['seconds']:8.1f} s   "
              f"peak RSS {peft['peak_rss_gib']:6.2f} GiB")
        diff = same_result(work / "ours", work / "peft", ["model.layers.0.self_attn.q_proj.weight",
                                                          "model.layers.0.mlp.down_proj.weight",
                                                          "model.embed_tokens.weight"])
        print(f"largest difference between the two outputs (3 tensors): {diff}")
        print(f"ratio peft/ours: peak RSS {peft['peak_rss_gib'] / ours['peak_rss_gib']:.2f}x, "
              f"seconds {peft['seconds'] / ours['seconds']:.2f}x")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
