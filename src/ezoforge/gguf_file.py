"""A merged Llama-architecture model folder -> one GGUF file for llama.cpp, Ollama and LM Studio (`ezo export`
writes them; the llamacpp backend runs one, made once by `models.gguf_of`).

Written with gguf-py (GGUFWriter, its tensor name map and quantizers) the way llama.cpp's convert_hf_to_gguf.py
does it for Llama: q/k rows permuted to llama.cpp's rotary layout, norms in F32, a tied output projection left
out, the byte-level BPE vocabulary, merges, special ids and chat template embedded. Lower-bit types are
llama.cpp's `llama-quantize` job (from a q8_0 or f16 file); we write only what gguf-py quantizes exactly.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import gguf
import numpy as np

from ezoforge.errors import ModelError
from ezoforge.records import atomic_path

log = logging.getLogger(__name__)

ARCHITECTURES = {"LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA}
TYPES = {"f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
         "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0)}


def check(model_dir: Path) -> tuple[dict, str]:
    """The folder's config and llama.cpp pre-tokenizer name, or a clear error naming what GGUF export can't take."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise ModelError(f"{model_dir}: not a model folder (no config.json)")
    config = json.loads(path.read_text(encoding="utf-8"))
    arch = (config.get("architectures") or ["(none)"])[0]
    if arch not in ARCHITECTURES:
        raise ModelError(f"{path}: architectures: GGUF export supports {', '.join(ARCHITECTURES)}, not {arch}")
    tok_path = Path(model_dir) / "tokenizer.json"
    tokenizer_json = json.loads(tok_path.read_text(encoding="utf-8")) if tok_path.exists() else {}
    if tokenizer_json.get("model", {}).get("type") != "BPE":
        raise ModelError(f"{model_dir}: GGUF export needs a byte-level BPE tokenizer.json (Llama 3, SmolLM2)")
    return config, pre_tokenizer(tokenizer_json)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (transformers' GGUF loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_factors(config: dict, head_dim: int) -> np.ndarray | None:
    """Llama 3.1's long-context rope scaling as llama.cpp's `rope_freqs` tensor; None without scaling."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise ModelError(f"config.json: rope_scaling type {kind!r} is not supported for GGUF export (llama3 is)")
    base = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for how the folder's tokenizer splits text before BPE."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and "p{N}{1,3}" in json.dumps(parts[0]):
        return "llama-bpe"
    raise ModelError(f"tokenizer.json: pre_tokenizer {kinds} has no llama.cpp name we know; llama.cpp would split "
                     "text differently from training, so no GGUF is written")


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, pre: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):  # rows of the embedding without a token get a placeholder, as llama.cpp does
        if i not in ids:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(ids[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)  # merges, special ids, template
    if not special.chat_template:
        raise ModelError(f"{model_dir}: no chat template to embed (chat_template.jinja or tokenizer_config.json)")
    special.add_to_gguf(writer, quiet=True)


def weights(model_dir: Path):
    """(name, shape, load) for every weight in the folder's safetensors shards; `load()` reads it as float32."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir}: no *.safetensors weights")
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, tuple(f.get_slice(name).get_shape()), lambda p=path, n=name: _load(p, n)


def _load(path: Path, name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor(name).float().numpy()


def write(model_dir: str | Path, out: str | Path, outtype: str = "f16") -> dict:
    """Write `out` (atomically); returns what went in it. Tensors stream through one at a time (the header,
    which lists every tensor's type and size, is planned from the shapes first), so a 70B model fits in RAM."""
    model_dir, out = Path(model_dir), Path(out)
    if outtype not in TYPES:
        raise ModelError(f"--gguf {outtype}: supported types are {', '.join(TYPES)}")
    config, pre = check(model_dir)
    file_type, matrix_type = TYPES[outtype]
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope = config.get("rope_parameters") or {}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16

    plan = []  # (gguf name, type, load) in file order
    factors = rope_factors(config, head_dim)
    if factors is not None:
        plan.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", F32, (factors.shape, lambda: factors)))
    for name, shape, load in weights(model_dir):
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.get("tie_word_embeddings")):
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ModelError(f"{model_dir}: tensor {name} has no GGUF name for a Llama model")
        heads = n_head if name.endswith("q_proj.weight") else n_kv if name.endswith("k_proj.weight") else None
        kind = F32  # norms stay F32; a matrix whose rows do not fill Q8_0 blocks falls back to F16
        if len(shape) == 2:
            kind = matrix_type if shape[-1] % gguf.GGML_QUANT_SIZES[matrix_type][0] == 0 else F16
        plan.append((target, kind, (shape, lambda ld=load, h=heads: permute(ld(), h) if h else ld())))

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(model_dir.name)
        writer.add_context_length(config.get("max_position_embeddings", 2048))
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config["vocab_size"])
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, model_dir, config["vocab_size"], pre)
        for target, kind, (shape, _) in plan:
            if kind in (F32, F16):
                dtype = np.float32 if kind == F32 else np.float16
                writer.add_tensor_info(target, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
            else:
                raw = gguf.quants.quant_shape_to_byte_shape(shape, kind)
                writer.add_tensor_info(target, raw, np.dtype(np.uint8), int(np.prod(raw)), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        counts: dict[str, int] = {}
        for target, kind, (_, load) in plan:
            data = load()
            writer.write_tensor_data(data.astype(np.float32 if kind == F32 else np.float16) if kind in (F32, F16)
                                     else gguf.quants.quantize(data, kind))
            counts[kind.name] = counts.get(kind.name, 0) + 1
        writer.close()
    log.info("wrote %s (%s, %.1f MB)", out, outtype, out.stat().st_size / 1e6)
    return {"file": out.name, "type": outtype, "bytes": out.stat().st_size, "tensor_types": counts}
