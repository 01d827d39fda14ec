"""llama.cpp as a synth and eval backend (llama-cpp-python's low-level API, the optional `cpu` extra): several
sequences decode together in one llama.cpp context, on the CPU at several times transformers' speed.

llama.cpp is fed our own prompt token ids (rendered and tokenized as for every local backend, never by llama.cpp's
tokenizer or chat template), and the generated ids are decoded by our tokenizer, so prompts and text handling are
the same whichever backend answers; only the numerics differ (a GGUF's weights, llama.cpp's kernels), and the
cache keys name the backend.
"""
from __future__ import annotations

import collections
import importlib.util
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ezoforge.config import LlamaCppConfig, SynthConfig
from ezoforge.errors import ConfigError, EzoError, ModelError
from ezoforge.infer.backends import Done, LocalBackend, Output, Request, Section, Target
from ezoforge.infer.generate import Sampling, TextSoFar, completion
from ezoforge.models import gguf_of, resolve, stop_token_ids

log = logging.getLogger(__name__)

INSTALL = "CMAKE_ARGS=\"-DLLAVA_BUILD=OFF\" pip install 'ezoforge[cpu]'"
MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ


def pick(logits: np.ndarray, sampling: Sampling, top_k: int, rng: np.random.Generator) -> int:
    """The next token as transformers' generate picks it: the argmax when greedy, else a draw after temperature,
    top-k and top-p (the nucleus cut from the unlikely end, as its TopPLogitsWarper does)."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    scores = logits.astype(np.float64) / sampling.temperature
    ids = np.argpartition(scores, -top_k)[-top_k:] if 0 < top_k < scores.size else np.arange(scores.size)
    ids = ids[np.argsort(scores[ids], kind="stable")]  # least likely first
    probs = np.exp(scores[ids] - scores[ids[-1]])
    probs /= probs.sum()
    if sampling.top_p < 1:
        keep = np.cumsum(probs) > 1 - sampling.top_p
        keep[-1] = True
        ids, probs = ids[keep], probs[keep] / probs[keep].sum()
    return int(rng.choice(ids, p=probs))


@dataclass
class _Sequence:
    index: int
    prompt: list[int]
    slot: int  # its llama.cpp sequence id
    rng: np.random.Generator
    fed: int = 0  # prompt tokens already in the KV cache
    out: list[int] = field(default_factory=list)

    @property
    def cells(self) -> int:
        """KV cells it holds once its prompt is in."""
        return len(self.prompt) + len(self.out)


def _free(lib, batch, ctx, model) -> None:
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    lib.llama_model_free(model)


class Engine:
    """One llama.cpp context decoding up to `sequences` sequences at once. Each decode call is one batch of at most
    `batch_tokens`: the next token of every sequence that is generating, then chunks of the prompts joining. A
    sequence joins when its prompt and its new tokens fit the KV cache the others leave, and frees its cells when it
    ends. Every sequence draws from its own generator, seeded by the request's seed, so its batch mates change its
    tokens only through float rounding (llama.cpp multiplies a one-token batch with other kernels than a larger one,
    which may flip a near-tie)."""

    def __init__(self, path: Path, threads: int, kv_tokens: int, batch_tokens: int, sequences: int):
        import llama_cpp

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp logs every load step otherwise
        self.lib = lib = llama_cpp
        lib.llama_backend_init()
        self.model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
        if not self.model:
            raise ModelError(f"{path}: llama.cpp cannot load it")
        self.vocab_size = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.sequences = min(sequences, MAX_SEQUENCES)
        self.batch_tokens = max(batch_tokens, self.sequences)  # room for one token of every sequence
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = kv_tokens, self.batch_tokens, min(self.batch_tokens, 512)
        params.n_seq_max = self.sequences
        params.kv_unified = True  # one pool of cells: each sequence takes what its length needs
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise ModelError(f"{path}: llama.cpp cannot make a context of {kv_tokens} tokens (llamacpp.kv_tokens)")
        self.kv_tokens = lib.llama_n_ctx(self.ctx)
        self.memory = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(self.batch_tokens, 0, 1)
        # Freed by close(), or when the engine is collected or the interpreter exits (a stage may never close it).
        self.close = weakref.finalize(self, _free, lib, self.batch, self.ctx, self.model)

    def _add(self, token: int, pos: int, slot: int, logits: bool) -> int:
        """Put one token in the batch; its row (where its logits are read)."""
        b, row = self.batch, self.batch.n_tokens
        b.token[row], b.pos[row], b.n_seq_id[row], b.seq_id[row][0], b.logits[row] = token, pos, 1, slot, logits
        b.n_tokens += 1
        return row

    def generate(self, prompts: list[list[int]], sampling: Sampling, top_k: int, ends: Callable[[int, int], bool],
                 done: Callable[[int, list[int] | Exception], None]) -> None:
        """Continue each prompt; report its new token ids through `done(index, ids)` as soon as it ends: with a token
        that `ends(index, token)` accepts, or at sampling.max_new_tokens. A prompt that cannot fit the KV cache with
        its new tokens gets an error instead."""
        lib = self.lib
        waiting = collections.deque(range(len(prompts)))
        slots = list(range(self.sequences))
        running: list[_Sequence] = []
        try:
            while waiting or running:
                # Join while a slot is free and the cache holds every joined sequence at its longest.
                while waiting and slots:
                    i = waiting[0]
                    need = len(prompts[i]) + sampling.max_new_tokens
                    if need > self.kv_tokens:
                        waiting.popleft()
                        done(i, EzoError(f"a prompt of {len(prompts[i])} tokens and generation.max_new_tokens "
                                         f"({sampling.max_new_tokens}) exceed llamacpp.kv_tokens ({self.kv_tokens})"))
                        continue
                    if need + sum(len(s.prompt) + sampling.max_new_tokens for s in running) > self.kv_tokens:
                        break
                    waiting.popleft()
                    running.append(_Sequence(i, prompts[i], slots.pop(0), np.random.default_rng(sampling.seed)))
                if not running:
                    continue
                self.batch.n_tokens = 0
                reads: list[tuple[_Sequence, int]] = []  # (sequence, the batch row of its next-token logits)
                for s in running:
                    if s.out:
                        reads.append((s, self._add(s.out[-1], s.cells - 1, s.slot, True)))
                for s in running:
                    room = self.batch_tokens - self.batch.n_tokens
                    if s.fed == len(s.prompt) or room == 0:
                        continue
                    chunk = s.prompt[s.fed: s.fed + room]
                    for pos, token in enumerate(chunk, s.fed):
                        row = self._add(token, pos, s.slot, pos == len(s.prompt) - 1)
                    s.fed += len(chunk)
                    if s.fed == len(s.prompt):
                        reads.append((s, row))
                if (rc := lib.llama_decode(self.ctx, self.batch)) != 0:
                    raise EzoError(f"llama.cpp failed to decode a batch (llama_decode returned {rc})")
                for s, row in reads:
                    logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, row), shape=(self.vocab_size,))
                    token = pick(logits, sampling, top_k, s.rng)
                    s.out.append(token)
                    if ends(s.index, token) or len(s.out) >= sampling.max_new_tokens:
                        lib.llama_memory_seq_rm(self.memory, s.slot, -1, -1)  # its cells are free for the next
                        running.remove(s)
                        slots.append(s.slot)
                        done(s.index, s.out)
        finally:
            lib.llama_memory_clear(self.memory, True)  # an interrupted call leaves nothing behind


def resolve_threads(setting: str | int) -> int:
    if setting != "auto":
        return int(setting)
    n = os.cpu_count() or 1
    log.info("llamacpp.threads=auto: %d (os.cpu_count); llama.cpp's threads spin while they wait, so set fewer when "
             "other work shares the cores", n)
    return n


def generation_config(spec: str):
    """The model's generation config, as transformers gives it to a loaded model: its file, else its config's."""
    from transformers import AutoConfig, GenerationConfig

    source = resolve(spec)
    try:
        return GenerationConfig.from_pretrained(source)
    except OSError:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(source))


class LlamaCppBackend(LocalBackend):
    """A GGUF run by llama.cpp: the model's own GGUF (bundled, a .gguf file) as it is; a merged model folder or hub
    id through an f16 GGUF that our exporter writes once into the cache (`models.gguf_of`). It answers with a
    whole model: eval refuses base + adapter (merge first). The engine starts on the first `run`."""

    name = "llamacpp"

    @classmethod
    def build(cls, section: Section, target: Target) -> "LlamaCppBackend":
        setting = "synth.backend" if isinstance(section, SynthConfig) else "eval.backend"
        if importlib.util.find_spec("llama_cpp") is None:
            raise ConfigError(f"{setting} is llamacpp but llama-cpp-python is not installed: {INSTALL} "
                              f"(`make install` tries it; it compiles llama.cpp), or set {setting} to transformers")
        path = Path(target.spec).expanduser()
        if path.is_dir():
            from ezoforge import gguf_file

            gguf_file.check(path)  # a model our exporter cannot write fails now, not after the stage has begun
        return cls(*cls.local_model(section, target), target.spec, section.llamacpp, section.generation.batch_size)

    def __init__(self, tokenizer, context_length: int, spec: str, cfg: LlamaCppConfig, sequences: int):
        super().__init__(tokenizer, min(context_length, cfg.kv_tokens))
        self.spec, self.cfg, self.sequences = spec, cfg, sequences
        generation = generation_config(spec)
        self.eos_ids = stop_token_ids(SimpleNamespace(generation_config=generation), tokenizer)
        self.top_k = 50 if generation.top_k is None else generation.top_k  # transformers' default when unset
        self.engine: Engine | None = None

    def _engine(self) -> Engine:
        if self.engine is None:
            self.engine = Engine(gguf_of(self.spec), resolve_threads(self.cfg.threads), self.cfg.kv_tokens,
                                 self.cfg.batch_tokens, self.sequences)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def run(self, reqs: list[Request], sampling: Sampling, done: Done) -> None:
        if sampling.json_schema is not None:
            raise ConfigError("the llamacpp backend does not constrain answers to a JSON schema")
        prompts = [self.prompt_ids(r) for r in reqs]
        texts = collections.defaultdict(lambda: TextSoFar(self.decode, sampling.stop))  # watched for stop strings

        def ends(i: int, token: int) -> bool:
            if token in self.eos_ids:
                return True
            if sampling.stop:
                texts[i].add(token)
                return texts[i].stopped
            return False

        def finished(i: int, result: list[int] | Exception) -> None:
            if isinstance(result, Exception):
                done(i, result)
                return
            c = completion(result, len(prompts[i]), self.eos_ids, self.decode, sampling)
            done(i, Output(reqs[i].prefill + c.text if reqs[i].prompt is None else c.text, c.prompt_tokens,
                           c.completion_tokens, c.finish_reason))

        self._engine().generate(prompts, sampling, self.top_k, ends, finished)
