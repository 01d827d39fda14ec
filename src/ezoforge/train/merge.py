"""`ezo merge`: fold a trained adapter into its base model and write a standalone model folder, tensor by tensor.

No model object is built. Each base shard is read through safetensors (memory-mapped); each LoRA target gets
`W + scale·B·A` computed in float32 and stored in the output dtype; every other tensor is copied. Each output shard
is written as its tensors are produced (the header first: shapes and dtypes are known beforehand), so host memory
peaks near one base shard + a float32 copy of its largest tensor + the adapter, whatever the model's size
(bench/merge_bench.py measures it against peft's merge_and_unload). The sum is taken in float32 from the base's
own full-precision weights, never 4-bit ones, whatever the adapter was trained against: merging into quantized
weights rounds the update away (a known source of broken merges).
"""
from __future__ import annotations

import json
import logging
import math
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from ezoforge.errors import ModelError
from ezoforge.models import pick_dtype, pin, resolve, split_revision, stop_token_ids
from ezoforge.records import Done
from ezoforge.stage import Stage, done_info

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PEFT_PREFIX = "base_model.model."
# Adapter key suffix -> (which factor, embedding layer). An embedding's factors are transposed relative to a
# linear layer's (peft keeps A as (r, vocab) and B as (dim, r)), so its delta is (B·A)ᵀ.
LORA_PARTS = {".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
              ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True)}
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def trained(train_dir: Path) -> Done:
    """A finished train (or prefer) folder's DONE marker (its settings' model names the base)."""
    info = done_info(train_dir)
    if info is None or not (train_dir / "adapter" / "adapter_config.json").exists():
        raise ModelError(f"{train_dir}: not a finished `ezo train` folder (needs adapter/ and DONE)")
    return info


def run(train_dir: Path, out: Path, dtype: str = "bfloat16", force: bool = False) -> dict:
    """`dtype`: the stored dtype of the merged model's floating tensors; `auto` keeps the base's."""
    train_dir, out = Path(train_dir), Path(out)
    info = trained(train_dir)
    made = info.settings["model"]
    # The base as train loaded it: a hub id at the revision train recorded (prefer records it pinned), no other.
    spec = pin(made["name"], made.get("revision"))
    name, revision = split_revision(spec)
    base = {"name": name, **({"revision": revision} if revision else {})}
    # `auto` is fingerprinted as such: the base (fingerprinted by its spec) determines what it becomes.
    stored = "auto" if dtype == "auto" else str(pick_dtype(dtype, torch.device("cpu"))).removeprefix("torch.")
    # The folder appears by rename once complete: a killed merge never leaves a loadable half model.
    stage = Stage("merge", out, {"merge": {"dtype": stored}}, model=base, inputs=[train_dir], atomic=True)
    finished = stage.start(force)
    if finished is not None:
        return finished
    with stage.claimed():
        return _merge(train_dir, stage, spec, dtype)


def _merge(train_dir: Path, stage: Stage, spec: str, dtype: str) -> dict:
    from transformers import AutoTokenizer

    start = time.perf_counter()
    adapter = train_dir / "adapter"
    base = base_folder(spec)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method")
        raise ModelError(f"{base / 'config.json'}: the base is quantized ({method}); merging needs its "
                         "full-precision weights")
    shards, indexed = weight_files(base, spec)
    updates = read_adapter(adapter, [n for names in shards.values() for n in names])
    target = base_dtype(config, base, shards) if dtype == "auto" else pick_dtype(dtype, torch.device("cpu"))
    if dtype == "auto":
        log.info("merge.dtype auto: storing in the base's dtype, %s", str(target).removeprefix("torch."))

    weight_map, total, params = {}, 0, 0
    for i, (file, names) in enumerate(shards.items(), 1):
        size, count = merge_shard(base / file, stage.folder / file, names, updates, target)
        weight_map.update(dict.fromkeys(names, file))
        total, params = total + size, params + count
        log.info("merged shard %d/%d (%s, %.0f MiB)", i, len(shards), file, size / 2**20)
    if indexed:
        (stage.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2) + "\n", encoding="utf-8")

    name = str(target).removeprefix("torch.")
    config["dtype"] = name  # transformers 5 reads `dtype`; older configs carry `torch_dtype`
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    (stage.folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(adapter)  # the tokenizer and chat template training used
    generation = generation_config(base)
    generation.eos_token_id = stop_token_ids(SimpleNamespace(generation_config=generation), tokenizer)
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(stage.folder)
    tokenizer.save_pretrained(stage.folder)
    log.info("merged %s + %s into %s (%s)", spec, adapter, stage.out, name)
    return stage.finish({"base": spec, "dtype": name, "eos_token_id": generation.eos_token_id, "params": params,
                         "lora_targets": len(updates), "shards": len(shards), "bytes": total,
                         "seconds": round(time.perf_counter() - start, 1)})


def base_folder(spec: str) -> Path:
    """A local folder holding the base's safetensors: a folder as given, a GGUF's converted cache, or a hub id's
    snapshot (its weights and configs only; the tokenizer comes from the adapter)."""
    source = resolve(spec)
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.safetensors", INDEX, "config.json",
                                                              "generation_config.json"]))
    except Exception as e:  # offline and not cached, gated, unknown repo
        raise ModelError(f"{spec}: cannot fetch the base's safetensors ({type(e).__name__}: {e})") from None


def weight_files(base: Path, spec: str) -> tuple[dict[str, list[str]], bool]:
    """{shard file: its tensor names} from the base's index (the names loaders use) or its single file; and
    whether the base is indexed."""
    from safetensors import safe_open

    if (base / INDEX).is_file():
        weight_map = json.loads((base / INDEX).read_text(encoding="utf-8"))["weight_map"]
        shards: dict[str, list[str]] = {}
        for name, file in sorted(weight_map.items()):
            shards.setdefault(file, []).append(name)
        return dict(sorted(shards.items())), True
    if (base / SINGLE).is_file():
        with safe_open(base / SINGLE, "pt") as f:
            return {SINGLE: sorted(f.keys())}, False
    found = sorted(p.name for p in base.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    raise ModelError(f"{spec}: {base} holds no safetensors weights ({', '.join(found) or 'no weight files'}); "
                     "`ezo merge` streams safetensors shards: save the base with transformers' save_pretrained "
                     "(safetensors by default) and train against that folder")


def configured_dtype(config: dict) -> str | None:
    """The dtype a model's config.json names (`dtype`, or the older `torch_dtype`), where torch knows it: what
    `merge.dtype: auto` keeps, here and in `ezo plan`."""
    named = config.get("dtype") or config.get("torch_dtype")
    return named if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype) else None


def base_dtype(config: dict, base: Path, shards: dict[str, list[str]]) -> torch.dtype:
    """The base's dtype: its config's, else its first floating tensor's."""
    from safetensors import safe_open

    if (named := configured_dtype(config)) is not None:
        return getattr(torch, named)
    for file, names in shards.items():
        with safe_open(base / file, "pt") as f:
            for name in names:
                if (dt := ST_DTYPES.get(f.get_slice(name).get_dtype())) is not None and dt.is_floating_point:
                    return dt
    return torch.float32


@dataclass
class Update:
    """What the adapter does to one base tensor: add scale·B·A (transposed for embeddings and fan_in_fan_out
    layers), or replace it (modules_to_save, a saved embedding base layer)."""
    key: str  # the adapter key it came from, for errors
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    scale: float = 1.0
    transpose: bool = False
    replace: torch.Tensor | None = None

    def apply(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        w = self.replace if self.replace is not None else weight
        if w.shape != weight.shape:
            raise ModelError(f"adapter key {self.key}: shape {list(w.shape)} does not fit base tensor {name} "
                             f"{list(weight.shape)}")
        if self.a is None:
            return w
        delta = self.b.float() @ self.a.float()
        delta = delta.T if self.transpose else delta
        if delta.shape != weight.shape:
            raise ModelError(f"adapter key {self.key}: B·A has shape {list(delta.shape)}, base tensor {name} has "
                             f"{list(weight.shape)}")
        # peft's W + (B·A)·scale on a float32 base, to the bit, but in place: one float32 copy of the tensor, not
        # three (the largest 70B weight is 0.9 GB in float32).
        return delta.mul_(self.scale).add_(w)


def read_adapter(adapter: Path, base_names: list[str]) -> dict[str, Update]:
    """The adapter as {base tensor name: Update}. Every adapter key must be understood and land on exactly one
    base tensor; anything else fails naming the key."""
    from peft.utils.other import get_pattern_key
    from safetensors import safe_open

    cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    where = adapter / "adapter_config.json"
    if cfg.get("peft_type") != "LORA":
        raise ModelError(f"{where}: peft_type {cfg.get('peft_type')!r}: `ezo merge` folds LoRA adapters only")
    for flag in ("use_dora", "lora_bias", "use_qalora"):
        if cfg.get(flag):
            raise ModelError(f"{where}: {flag} is set; `ezo merge` folds plain LoRA (A·B) updates only")
    if cfg.get("layer_replication") or cfg.get("trainable_token_indices"):
        raise ModelError(f"{where}: layer_replication / trainable_token_indices are not supported by `ezo merge`")
    file = adapter / "adapter_model.safetensors"
    if not file.is_file():
        raise ModelError(f"{adapter}: no adapter_model.safetensors (save the adapter with safetensors)")
    names = set(base_names)
    alpha_pattern = cfg.get("alpha_pattern") or {}
    updates: dict[str, Update] = {}
    factors: dict[str, dict] = {}
    with safe_open(file, "pt") as f:
        for key in f.keys():
            short = key.removeprefix(PEFT_PREFIX)
            part = next(((s, p) for s, p in LORA_PARTS.items() if short.endswith(s)), None)
            if part is not None:
                module = short[: -len(part[0])]
                entry = factors.setdefault(module, {"key": key, "embedding": part[1][1]})
                entry[part[1][0]] = f.get_tensor(key)
            elif "lora_" in short or "token_adapter" in short:
                raise ModelError(f"{file}: key {key}: an adapter weight `ezo merge` does not fold (it folds LoRA A/B "
                                 "on linear and embedding layers, and modules_to_save)")
            else:  # modules_to_save, or the base layer peft saves beside an embedding LoRA: the tensor replaces
                name = match(short.replace(".base_layer.", "."), names, key, file)
                updates.setdefault(name, Update(key)).replace = f.get_tensor(key)
    for module, entry in factors.items():
        if "A" not in entry or "B" not in entry:
            raise ModelError(f"{file}: key {entry['key']}: LoRA factor {'B' if 'A' in entry else 'A'} is missing")
        a, b = entry["A"], entry["B"]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ModelError(f"{file}: key {entry['key']}: LoRA factors {list(a.shape)} and {list(b.shape)} are not "
                             "a linear/embedding pair (convolution LoRA is not supported)")
        r = a.shape[0]
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), cfg["lora_alpha"])
        update = updates.setdefault(match(module + ".weight", names, entry["key"], file), Update(entry["key"]))
        update.key, update.a, update.b = entry["key"], a, b
        update.scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        update.transpose = entry["embedding"] or bool(cfg.get("fan_in_fan_out"))
    return updates


def without_model_levels(name: str) -> str:
    """A tensor name without its `model.` levels: a multimodal checkpoint stores `language_model.model.layers…`
    where the loaded model (and so its adapter) says `model.language_model.layers…` (Gemma 3)."""
    return ".".join(part for part in name.split(".") if part != "model")


def match(name: str, names: set[str], key: str, file: Path) -> str:
    """The base tensor an adapter key means: the same name, else the one name that differs only by a leading
    module prefix (a checkpoint saved from the inner model, or a wrapper's extra level), else the one that differs
    only by where its `model.` levels sit."""
    if name in names:
        return name
    found = [n for n in names if n.endswith("." + name) or name.endswith("." + n)]
    if not found:
        found = [n for n in names if without_model_levels(n) == without_model_levels(name)]
    if len(found) == 1:
        return found[0]
    what = f"matches several base tensors ({', '.join(sorted(found)[:4])})" if found else "matches no base tensor"
    raise ModelError(f"{file}: key {key} {what}: was this adapter trained on another base model?")


def merge_shard(src: Path, dst: Path, names: list[str], updates: dict[str, Update],
                target: torch.dtype) -> tuple[int, int]:
    """One output shard from one base shard; returns (bytes, elements) written."""
    from safetensors import safe_open

    with safe_open(src, "pt") as f:
        layout = []
        for name in names:
            piece = f.get_slice(name)
            dt = ST_DTYPES.get(piece.get_dtype())
            if dt is None:
                raise ModelError(f"{src}: tensor {name} has dtype {piece.get_dtype()}, which `ezo merge` cannot copy")
            if name in updates and not dt.is_floating_point:
                raise ModelError(f"{src}: tensor {name} is {piece.get_dtype()} (quantized?): an adapter cannot be "
                                 "folded into it")
            layout.append((name, target if dt.is_floating_point else dt, list(piece.get_shape())))

        def tensor(name: str) -> torch.Tensor:
            weight = f.get_tensor(name)
            if name in updates:
                weight = updates[name].apply(weight, name)
            return weight.to(target) if weight.is_floating_point() else weight

        size = write_safetensors(dst, layout, tensor)
    return size, sum(math.prod(shape) for _, _, shape in layout)


def write_safetensors(path: Path, layout: list[tuple[str, torch.dtype, list[int]]],
                      tensor: Callable[[str], torch.Tensor]) -> int:
    """Write a safetensors file holding one tensor at a time: the header from `layout` (name, dtype, shape), then
    each `tensor(name)`'s bytes as it is made (safetensors' save_file holds the whole file, twice). Returns the
    data bytes written."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dt, shape in layout:
        nbytes = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": ST_NAMES[dt], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for name, dt, shape in layout:
            t = tensor(name)
            if t.dtype != dt or list(t.shape) != shape:
                raise ModelError(f"{path}: tensor {name} came out {t.dtype} {list(t.shape)}, not {dt} {shape}")
            out.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return offset


def generation_config(base: Path):
    """The base's generation config, or the one transformers derives from its config."""
    from transformers import AutoConfig, GenerationConfig

    if (base / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(base)
    return GenerationConfig.from_model_config(AutoConfig.from_pretrained(base))


def summary(folder: Path) -> str:
    """The stage in one sentence, from its finished folder: what `ezo merge` prints and the run report shows."""
    m = done_info(folder).stats
    params = f", {m['params'] / 1e6:,.0f}M parameters" if m.get("params") else ""
    return f"{m.get('base')} + its adapter merged into a standalone {m.get('dtype', '')} model{params}"
