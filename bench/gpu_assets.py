"""What bench/gpu_check.sh needs besides wheels, for a GPU machine without a hub or ../shared.

    python bench/gpu_assets.py pack DIR          # here (make gpu-bundle): Llama 3 tokenizer, converted + Japanese prompts
    python bench/gpu_assets.py model DIR OUT     # there: a random-weight Llama-3.1-8B-shaped model folder + tokenizer
    python bench/gpu_assets.py pairs OUT         # there: instruction/response rows for `ezo train`
    python bench/gpu_assets.py peak OUT -- CMD…  # there: run CMD, write its exit code and peak RSS to OUT (JSON)

The tokenizer is converted here from the tiktoken file of `llama-models` with transformers' TikTokenConverter (the
GPU machine's minutes go to the GPU) and travels as its HF tokenizer.json, xz-compressed (1.7 MB of 17 MB).
"""
from __future__ import annotations

import argparse
import json
import lzma
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARAGRAPHS = ROOT.parent / "shared" / "data" / "jglue" / "jsquad" / "wikipedia_paragraphs.jsonl"
XZ = "tokenizer.json.xz"
# Shards of the random model: the streaming merge works shard by shard, so the check gives it several.
SHARD = "1GB"
# Llama 3.1's chat format: header, content, <|eot_id|> per turn.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
                 " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# Llama-3.1-8B: hidden 4,096, 32 heads over 8 KV heads, MLP 14,336, vocabulary 128,256.
SHAPE_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009)


def pack(out: Path) -> None:
    import llama_models.llama3.tokenizer as lt
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    out.mkdir(parents=True, exist_ok=True)
    meta = lt.Tokenizer.get_instance()
    backend = TikTokenConverter(vocab_file=str(Path(lt.__file__).parent / "tokenizer.model"), pattern=meta.pat_str,
                                extra_special_tokens=meta.special_tokens).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|finetune_right_pad_id|>")
    tok.chat_template = CHAT_TEMPLATE
    folder = out / "hf-tokenizer"
    tok.save_pretrained(folder)
    plain = folder / "tokenizer.json"
    with open(plain, "rb") as src, lzma.open(plain.with_name(XZ), "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain.unlink()
    lines = PARAGRAPHS.read_text(encoding="utf-8").splitlines()[:256]  # generate_bench.py's prompt source
    (out / "paragraphs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def tokenizer(assets: Path):
    """The Llama 3 tokenizer with the Llama 3.1 chat template, as `pack` converted it."""
    from transformers import AutoTokenizer

    folder = assets / "hf-tokenizer"
    if not (folder / "tokenizer.json").exists():
        with lzma.open(folder / XZ) as src, open(folder / "tokenizer.json", "wb") as dst:
            shutil.copyfileobj(src, dst)
    return AutoTokenizer.from_pretrained(folder)


def model(assets: Path, out: Path, layers: int, tiny: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    small = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2) if tiny else {}
    config = LlamaConfig(**{**SHAPE_8B, **small, "num_hidden_layers": layers})
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the card: never a float32 copy
    try:
        with device:
            m = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    m.save_pretrained(out, max_shard_size=SHARD)
    tokenizer(assets).save_pretrained(out)
    print(f"{out}: random Llama-3.1-8B {'vocabulary' if tiny else 'shape'}, {layers} layers, {sum(p.numel() for p in m.parameters()) / 1e9:.2f} B")


def peak(out: Path, cmd: list[str]) -> int:
    """Run `cmd`; record its exit code and its peak resident memory (the largest of it and its children)."""
    import resource
    import subprocess

    rc = subprocess.call(cmd)
    kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out.write_text(json.dumps({"cmd": cmd, "rc": rc, "peak_rss_gib": round(kib / 2**20, 3)}))
    return rc


def pairs(out: Path) -> None:
    from importlib.resources import files

    rows = [json.loads(line) for line in files("ezoforge").joinpath("data/tasks/demo-tasks.jsonl")
            .read_text(encoding="utf-8").splitlines()]
    with open(out, "w", encoding="utf-8") as f:
        for _ in range(8):  # enough rows for a few packed steps
            for r in rows:
                f.write(json.dumps({"instruction": r["input"], "response": r["output"]}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["pack", "model", "pairs", "peak"])
    ap.add_argument("paths", nargs="+", help="peak: OUT -- CMD…")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="model: widths of 64 (CPU check of the script)")
    a = ap.parse_args()
    paths = [Path(x) for x in a.paths[:2]]
    sys.exit({"pack": lambda: pack(paths[0]), "model": lambda: model(paths[0], paths[1], a.layers, a.tiny),
              "pairs": lambda: pairs(paths[0]), "peak": lambda: peak(paths[0], a.paths[1:])}[a.what]())
