"""A merged model folder (Llama, Mistral, Qwen3, Gemma 3) -> one GGUF file for llama.cpp, Ollama and LM Studio
(`ezo export` writes them; the llamacpp backend runs one, made once by `models.gguf_of`).

Written with gguf-py (GGUFWriter, its architecture tables, tensor name maps and quantizers) the way llama.cpp's
convert_hf_to_gguf.py does it: q/k rows permuted to llama.cpp's rotary layout where the family rotates halves,
Gemma's (1 + w) norms stored as llama.cpp multiplies them, norms in F32, a tied output projection left out, the
vocabulary (byte-level BPE with merges, or SentencePiece-style with scores), special ids and chat template embedded.
Lower-bit types are llama.cpp's `llama-quantize` job (from a q8_0 or f16 file); we write only what gguf-py quantizes
exactly.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ezoforge.errors import ModelError
from ezoforge.records import atomic_path

log = logging.getLogger(__name__)

TYPES = {"f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
         "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0)}
# Qwen2's pre-tokenizer regex (Qwen2.5, Qwen3): llama.cpp's "qwen2" splits text the same way.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class Family:
    """What llama.cpp's graph for an architecture expects beyond the shared layout."""

    arch: gguf.MODEL_ARCH
    rotate_half: bool  # HF's rotate-half rope rows become llama.cpp's interleaved pairs (Llama, Mistral); the NeoX-rope
    # graphs (Qwen3, Gemma 3) read HF's order as it is
    norm_shift: float = 0.0  # Gemma's RMSNorm scales by (1 + w), llama.cpp's by the stored weight


FAMILIES = {"LlamaForCausalLM": Family(gguf.MODEL_ARCH.LLAMA, True),
            "MistralForCausalLM": Family(gguf.MODEL_ARCH.LLAMA, True),  # llama.cpp runs Mistral as Llama
            "Qwen3ForCausalLM": Family(gguf.MODEL_ARCH.QWEN3, False),
            "Gemma3ForCausalLM": Family(gguf.MODEL_ARCH.GEMMA3, False, 1.0),
            # the 4B and larger checkpoints: the text model is written, the vision tower left out
            "Gemma3ForConditionalGeneration": Family(gguf.MODEL_ARCH.GEMMA3, False, 1.0)}
ARCHITECTURES = tuple(FAMILIES)
# A config without `architectures` is read by its model_type, as transformers' Auto classes read it.
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "gemma3_text": "Gemma3ForCausalLM", "gemma3": "Gemma3ForConditionalGeneration"}


def architecture(config: dict) -> str:
    return (config.get("architectures") or [MODEL_TYPES.get(config.get("model_type"), "(none)")])[0]
# llama.cpp's Gemma 3 graph: every sixth layer attends to the whole context, the others to the sliding window with
# this rope base.
GEMMA3_FULL_EVERY, GEMMA3_SLIDING_ROPE_THETA = 6, 10000.0


def text_config(config: dict) -> dict:
    """The language model's settings (a multimodal checkpoint nests them in `text_config`)."""
    return {**config, **config["text_config"]} if isinstance(config.get("text_config"), dict) else config


def check(model_dir: Path) -> tuple[dict, str]:
    """The folder's (text) config and tokenizer kind ("spm", or llama.cpp's pre-tokenizer name for a byte-level BPE),
    or a clear error naming what GGUF export can't take."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise ModelError(f"{model_dir}: not a model folder (no config.json)")
    config = json.loads(path.read_text(encoding="utf-8"))
    arch = architecture(config)
    if arch not in FAMILIES:
        raise ModelError(f"{path}: architectures: GGUF export supports {', '.join(FAMILIES)}, not {arch}")
    config = text_config(config)
    if FAMILIES[arch].arch == gguf.MODEL_ARCH.GEMMA3:
        check_gemma3(path, config)
    elif config.get("use_sliding_window", True) and (config.get("sliding_window") or 0) < \
            config.get("max_position_embeddings", 0) and config.get("sliding_window"):
        raise ModelError(f"{path}: sliding_window {config['sliding_window']}: llama.cpp's {FAMILIES[arch].arch.name.lower()} "
                         "graph attends to the whole context, so past the window its GGUF would compute otherwise")
    tok_path = Path(model_dir) / "tokenizer.json"
    tokenizer_json = json.loads(tok_path.read_text(encoding="utf-8")) if tok_path.exists() else {}
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise ModelError(f"{model_dir}: GGUF export needs a BPE tokenizer.json: byte-level (Llama 3, Qwen, SmolLM2) or "
                         "SentencePiece-style with byte fallback (Gemma, Mistral)")
    return config, "spm" if model.get("byte_fallback") else pre_tokenizer(tokenizer_json)


def check_gemma3(path: Path, config: dict) -> None:
    """llama.cpp fixes parts of Gemma 3's graph that transformers reads from the config: refuse a config that differs."""
    n = config["num_hidden_layers"]
    wanted = ["full_attention" if (i + 1) % GEMMA3_FULL_EVERY == 0 else "sliding_attention" for i in range(n)]
    if config.get("layer_types", wanted) != wanted:
        raise ModelError(f"{path}: layer_types: llama.cpp's Gemma 3 makes every {GEMMA3_FULL_EVERY}th layer full "
                         "attention and the others sliding; this model differs, so its GGUF would compute otherwise")
    sliding = (config.get("rope_parameters") or {}).get("sliding_attention") or {}
    if sliding.get("rope_theta", config.get("rope_local_base_freq", GEMMA3_SLIDING_ROPE_THETA)) != \
            GEMMA3_SLIDING_ROPE_THETA:
        raise ModelError(f"{path}: rope_parameters.sliding_attention.rope_theta: llama.cpp's Gemma 3 uses "
                         f"{GEMMA3_SLIDING_ROPE_THETA:g} for its sliding layers")
    head_dim = config.get("head_dim", 256)
    scale = config["hidden_size"] // config["num_attention_heads"] if n == 62 else head_dim  # the 27B's own rule
    if config.get("query_pre_attn_scalar", scale) != scale:
        raise ModelError(f"{path}: query_pre_attn_scalar: llama.cpp's Gemma 3 scales queries by 1/sqrt({scale})")


def rope_settings(config: dict, arch: gguf.MODEL_ARCH) -> dict:
    """The rope of the model's full-attention layers (Gemma 3 keeps one per layer kind)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if arch == gguf.MODEL_ARCH.GEMMA3:
        rope = rope.get("full_attention", rope)
    return {"rope_theta": config.get("rope_theta", 10000.0), **rope}


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
    """llama.cpp's name for how the folder's byte-level tokenizer splits text before BPE."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT:
        return "qwen2"
    if kinds == ["Split", "ByteLevel"] and "p{N}{1,3}" in json.dumps(parts[0]):
        return "llama-bpe"
    raise ModelError(f"tokenizer.json: pre_tokenizer {kinds} has no llama.cpp name we know; llama.cpp would split "
                     "text differently from training, so no GGUF is written")


def token_type(i: int, text: str, tokenizer) -> gguf.TokenType:
    added = tokenizer.added_tokens_decoder
    if i in added:
        return gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
    if i == tokenizer.unk_token_id:
        return gguf.TokenType.UNKNOWN
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def spm_scores(tokenizer_json: dict, vocab_size: int) -> list[float]:
    """SentencePiece scores for a BPE tokenizer.json: llama.cpp's SPM tokenizer merges the highest-scoring pair
    first, so the piece a merge makes scores minus that merge's rank, and BPE's merge order is kept."""
    model = tokenizer_json["model"]
    scores = [0.0] * vocab_size
    for rank, merge in enumerate(model.get("merges", [])):
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        i = model["vocab"].get(a + b)
        if i is not None and i < vocab_size and scores[i] == 0.0:
            scores[i] = -float(rank + 1)
    return scores


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, kind: str) -> None:
    """The vocabulary as llama.cpp reads it: a byte-level BPE with its merges ("gpt2" and the pre-tokenizer's name),
    or a SentencePiece-style one with scores and byte pieces ("llama"); then special ids and the chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens, types = [], []
    for i in range(vocab_size):  # rows of the embedding without a token get a placeholder, as llama.cpp does
        tokens.append(ids.get(i, f"[PAD{i}]"))
        types.append(token_type(i, ids[i], tokenizer) if i in ids else gguf.TokenType.UNUSED)
    spm = kind == "spm"
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    if spm:
        tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        writer.add_token_scores(spm_scores(tokenizer_json, vocab_size))
        # Metaspace's "first" (Mistral, Llama 2) puts ▁ before the text; a plain space replacement (Gemma) does not.
        pre, norm = tokenizer_json.get("pre_tokenizer") or {}, tokenizer_json.get("normalizer") or {}
        writer.add_add_space_prefix(pre.get("prepend_scheme") in ("first", "always")
                                    or any(n.get("type") == "Prepend" for n in norm.get("normalizers", [])))
    else:
        writer.add_tokenizer_pre(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=not spm, n_vocab=vocab_size)  # special ids, template
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


def tensor_name(name: str) -> str | None:
    """The HF name as the text model's own (a multimodal checkpoint prefixes it); None for the vision tower's."""
    if name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                        "model.multi_modal_projector.")):
        return None
    return name.replace("language_model.model.", "model.").replace("language_model.", "")


def write(model_dir: str | Path, out: str | Path, outtype: str = "f16") -> dict:
    """Write `out` (atomically); returns what went in it. Tensors stream through one at a time (the header,
    which lists every tensor's type and size, is planned from the shapes first), so a 70B model fits in RAM."""
    model_dir, out = Path(model_dir), Path(out)
    if outtype not in TYPES:
        raise ModelError(f"--gguf {outtype}: supported types are {', '.join(TYPES)}")
    config, tokenizer_kind = check(model_dir)
    family = FAMILIES[architecture(json.loads((model_dir / "config.json").read_text(encoding="utf-8")))]
    file_type, matrix_type = TYPES[outtype]
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope = rope_settings(config, family.arch)
    tied = config.get("tie_word_embeddings", family.arch == gguf.MODEL_ARCH.GEMMA3)
    names = gguf.get_tensor_name_map(family.arch, n_layers)
    F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16

    plan = []  # (gguf name, type, load) in file order
    factors = rope_factors(config, head_dim) if family.arch == gguf.MODEL_ARCH.LLAMA else None
    if factors is not None:
        plan.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", F32, (factors.shape, lambda: factors)))
    for name, shape, load in weights(model_dir):
        own = tensor_name(name)
        if own is None or own.endswith("rotary_emb.inv_freq") or (own == "lm_head.weight" and tied):
            continue
        target = names.get_name(own, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ModelError(f"{model_dir}: tensor {name} has no GGUF name for a {family.arch.name.lower()} model")
        heads = (n_head if own.endswith("q_proj.weight") else n_kv if own.endswith("k_proj.weight") else None) \
            if family.rotate_half else None
        shift = family.norm_shift if own.endswith("norm.weight") else 0.0
        kind = F32  # norms stay F32; a matrix whose rows do not fill Q8_0 blocks falls back to F16
        if len(shape) == 2:
            kind = matrix_type if shape[-1] % gguf.GGML_QUANT_SIZES[matrix_type][0] == 0 else F16
        plan.append((target, kind, (shape, lambda ld=load, h=heads, s=shift: (permute(ld(), h) if h else ld()) + s)))

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[family.arch])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(model_dir.name)
        writer.add_context_length(config.get("max_position_embeddings", 2048))
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_freq_base(rope["rope_theta"])
        if rope.get("rope_type") == "linear":  # Gemma 3's global layers from 4B up
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["factor"])
        elif family.arch != gguf.MODEL_ARCH.LLAMA and rope.get("rope_type", "default") != "default":
            raise ModelError(f"{model_dir}/config.json: rope type {rope['rope_type']!r} is not supported for GGUF "
                             f"export of {family.arch.name.lower()}")
        if family.arch == gguf.MODEL_ARCH.GEMMA3:
            writer.add_sliding_window(config["sliding_window"])
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config["vocab_size"])
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, model_dir, config["vocab_size"], tokenizer_kind)
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
