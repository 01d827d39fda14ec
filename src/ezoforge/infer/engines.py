"""Which engine answers chats for `ezo generate`, `chat`, `serve` and a local judge: transformers or llama.cpp, by a
backend setting (`model.backend`, `eval.judge_backend`). `auto` takes llama.cpp where it can run the model as stated
and says why when it cannot; a stated `llamacpp` that cannot fails before anything loads."""
from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ezoforge.config import LlamaCppConfig
from ezoforge.errors import ConfigError, EzoError
from ezoforge.infer.generate import ChatEngine, Generator
from ezoforge.infer.llamacpp import LlamaCppGenerator, check_convertible, require_installed
from ezoforge.models import GGUF_OF, Loaded, check_spec, load_tokenizer, pick_device, require_chat_template, spec_context_length

log = logging.getLogger(__name__)
T = TypeVar("T")


def in_own_thread(work: Callable[[], T]) -> T:
    """`work()` in a thread that ends with it, for torch's work in a process where llama.cpp computes later. libgomp
    (torch's and llama.cpp's OpenMP, one library in one process) keeps a team of threads for each thread that has
    computed in parallel until that thread ends; with more of them than cores, every team waits by sleeping, and
    llama.cpp, whose kernels meet at an OpenMP barrier many times a token, decodes at half speed (60 -> 27-32 tokens/s
    on 2 cores). Torch's work in a passing thread takes its team with it."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, work()))
        except BaseException as e:  # raised again in the caller's thread
            result.append((False, e))

    thread = threading.Thread(target=run, name="ezo-torch-work", daemon=True)  # daemon: Ctrl-C ends the process
    thread.start()
    while thread.is_alive():  # in short waits: a Ctrl-C that another thread took runs its handler here only between them
        thread.join(0.2)
    ok, value = result[0]
    if not ok:
        raise value
    return value


def llamacpp_ruled_out(device_type: str, adapter: str | Path | None, quantize: str) -> str | None:
    """Why a backend `auto` cannot take llama.cpp on this kind of device, for this load (None: it may). `ezo plan`
    asks it about the planned card ("cuda"): a card rules llama.cpp out."""
    if device_type != "cpu":
        return f"the model runs on {device_type}"
    if adapter is not None:
        return "an adapter is given (llama.cpp runs a whole model: merge it first)"
    if quantize in ("nf4", "int8"):
        return f"model.quantize is {quantize} (bitsandbytes)"
    return None


def why_not_llamacpp(spec: str, adapter: str | Path | None, device: str, quantize: str) -> str | None:
    """Why llama.cpp cannot answer for this model as stated, here (None: it can)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed"
    if reason := llamacpp_ruled_out(pick_device(device).type, adapter, quantize):
        return reason
    try:
        check_convertible(spec)
    except EzoError as e:
        return str(e)
    return None


def choose(backend: str, setting: str, spec: str, adapter: str | Path | None = None, device: str = "auto",
           quantize: str = "auto", llamacpp: LlamaCppConfig | None = None) -> str:
    """The engine's name for a stated or `auto` backend setting."""
    check_spec(spec)  # a model that cannot load fails as such, whichever engine would run it
    if backend == "transformers":
        return backend
    if backend == "llamacpp":
        require_installed(setting)
    reason = why_not_llamacpp(spec, adapter, device, quantize)
    if backend == "llamacpp":
        if reason:
            raise ConfigError(f"{setting} is llamacpp but {reason}")
        return backend
    if reason and llamacpp is not None and llamacpp.model_fields_set:
        stated = sorted(llamacpp.model_fields_set)[0]
        raise ConfigError(f"llamacpp.{stated} is stated but {setting}=auto cannot use llama.cpp: {reason}")
    picked = "transformers" if reason else "llamacpp"
    log.info("%s=auto: %s (%s)", setting, picked, reason or "llama.cpp runs the model on this CPU")
    return picked


def identity(engine: str, model_identity: str) -> str:
    """What answer cache keys name as the model: llama.cpp's answers differ from transformers' by float rounding and
    by the GGUF it runs (`models.gguf_of`), so they are kept apart; other engines are named by their own keys."""
    return f"{model_identity}:llamacpp:{GGUF_OF}" if engine == "llamacpp" else model_identity


def open_engine(engine: str, spec: str, chat_template: str | Path | None, llamacpp: LlamaCppConfig, sequences: int,
                load: Callable[[], Loaded]) -> ChatEngine:
    """The chosen engine on the model: `load()` gives transformers' loaded model; llama.cpp reads the GGUF and needs
    only the tokenizer here."""
    if engine == "transformers":
        return Generator(load())
    tokenizer = load_tokenizer(spec, chat_template)
    require_chat_template(tokenizer, spec)
    return LlamaCppGenerator(spec, tokenizer, spec_context_length(spec), llamacpp, sequences)


def pick_backend(section, setting: str, spec: str, adapter: str | Path | None = None, device: str = "auto",
                 quantize: str = "auto"):
    """`section` (synth's or eval's) with its backend as used: `auto` becomes llamacpp where llama.cpp can run the
    model as stated, else transformers (logged). Stages record the backend used, so their fingerprints and cache keys
    name it."""
    if section.backend != "auto":
        return section
    return section.model_copy(update={"backend": choose("auto", setting, spec, adapter, device, quantize,
                                                        section.llamacpp)})
