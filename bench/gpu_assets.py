"""What bench/gpu_check.sh needs besides wheels, for a GPU machine without a hub or ../shared.

    python bench/gpu_assets.py pack DIR          # here (make gpu-bundle): Llama 3 tokenizer file + Japanese prompts
    python bench/gpu_assets.py model DIR OUT     # there: a random-weight Llama-3.1-8B-shaped model folder + tokenizer
    python bench/gpu_assets.py pairs OUT         # there: instruction/response rows for `ezo train`

The tokenizer travels as the tiktoken file of `llama-models` (gzipped, ~1 MB; the HF tokenizer.json is 17 MB) with
its split pattern and special tokens, and is rebuilt there with transformers' TikTokenConverter.
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARAGRAPHS = ROOT.parent / "shared" / "data" / "jglue" / "jsquad" / "wikipedia_paragraphs.jsonl"
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

    out.mkdir(parents=True, exist_ok=True)
    meta = lt.Tokenizer.get_instance()
    with open(Path(lt.__file__).parent / "tokenizer.model", "rb") as src, gzip.open(out / "tokenizer.model.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (out / "tokenizer.json").write_text(json.dumps({"pat_str": meta.pat_str, "special_tokens": meta.special_tokens}))
    lines = PARAGRAPHS.read_text(encoding="utf-8").splitlines()[:256]  # generate_bench.py's prompt source
    (out / "paragraphs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def tokenizer(assets: Path):
    """The Llama 3 tokenizer with the Llama 3.1 chat template; converted once (~a minute of Python), then cached."""
    import tempfile

    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    cache = assets / "hf-tokenizer"
    if (cache / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(cache)
    meta = json.loads((assets / "tokenizer.json").read_text())
    with tempfile.NamedTemporaryFile(suffix=".model") as f:
        f.write(gzip.decompress((assets / "tokenizer.model.gz").read_bytes()))
        f.flush()
        backend = TikTokenConverter(vocab_file=f.name, pattern=meta["pat_str"],
                                    extra_special_tokens=meta["special_tokens"]).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|finetune_right_pad_id|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(cache)
    return tok


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
    m.save_pretrained(out)
    tokenizer(assets).save_pretrained(out)
    print(f"{out}: random Llama-3.1-8B {'vocabulary' if tiny else 'shape'}, {layers} layers, {sum(p.numel() for p in m.parameters()) / 1e9:.2f} B")


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
    ap.add_argument("what", choices=["pack", "model", "pairs"])
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="model: widths of 64 (CPU check of the script)")
    a = ap.parse_args()
    {"pack": lambda: pack(a.paths[0]), "model": lambda: model(a.paths[0], a.paths[1], a.layers, a.tiny),
     "pairs": lambda: pairs(a.paths[0])}[a.what]()
