"""llama.cpp on the CPU (llama-cpp-python's low-level API, the optional `cpu` extra): a synth and eval backend, and
the engine of `ezo generate`, `chat`, `serve` and a local judge. Several sequences decode together in one llama.cpp
context through the continuous-batching loop (`infer.batching`), at several times transformers' speed on a CPU.

llama.cpp is fed our own prompt token ids (rendered and tokenized as for every local backend, never by llama.cpp's
tokenizer or chat template), and the generated ids are decoded by our tokenizer, so prompts and text handling are
the same whichever backend answers; only the numerics differ (a GGUF's weights, llama.cpp's kernels), and the
cache keys name the backend.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ezoforge.completion import Completion
from ezoforge.config import LlamaCppConfig, ServeConfig
from ezoforge.errors import ConfigError, EzoError, ModelError
from ezoforge.infer.backends import Done, LocalBackend, Request, Section, Target
from ezoforge.infer.batching import Batcher, Job
from ezoforge.infer.generate import ChatEngine, Sampling
from ezoforge.models import gguf_of, resolve, stop_token_ids
from ezoforge.sizing import GIB, PROCESS_RAM_GIB, EngineEstimate, EngineJob, weight_bytes

log = logging.getLogger(__name__)

INSTALL = "CMAKE_ARGS=\"-DLLAVA_BUILD=OFF\" pip install 'ezoforge[cpu]'"
MAX_SEQUENCES = 255  # llama.cpp's LLAMA_MAX_SEQ, less the shared prefix's
MIN_SHARED = 64  # prompt tokens in common worth a copy of the shared prefix rather than a prefill


def _free(lib, batch, ctx, model) -> None:
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    lib.llama_model_free(model)


class Engine:
    """One llama.cpp context holding up to `sequences` sequences of at most `kv_tokens` tokens each; `feed` runs one
    step for several sequences at once, in decode calls of at most `batch_tokens` tokens. Each sequence keeps its own
    KV cells (not one shared pool): attention then reads only its own, 1.5x faster on this CPU for 8 sequences of
    1,000 tokens (prefill 417 vs 271 tokens/s, decoding 119 vs 84).

    One more sequence holds a shared prefix: the longest start two recent prompts, or prompts joining together, had in
    common (synth's instructions and worked example, a judge's rubric, a chat's history). A prompt that starts with it
    copies its cells instead of prefilling them again; the copy gives the same logits as the prefill."""

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
        params.n_ctx, params.n_batch = kv_tokens * (self.sequences + 1), self.batch_tokens
        params.n_ubatch = min(self.batch_tokens, 512)  # larger steps prefilled slower here
        params.n_seq_max = self.sequences + 1
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise ModelError(f"{path}: llama.cpp cannot make a context of {self.sequences} x {kv_tokens} tokens "
                             "(llamacpp.kv_tokens)")
        self.kv_tokens = lib.llama_n_ctx(self.ctx) // (self.sequences + 1)
        self.memory = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(self.batch_tokens, 0, 1)
        self.lock = threading.Lock()  # held by each step and each release: one context, one caller at a time
        self.taken: set[int] = set()
        self.shared: list[int] = []  # the tokens the last sequence (`sequences`) holds
        self.last_prompt: list[int] = []
        # Freed by close(), or when the engine is collected or the interpreter exits (a stage may never close it).
        self.close = weakref.finalize(self, _free, lib, self.batch, self.ctx, self.model)

    def claim(self, cells: int) -> int | None:
        """A free sequence for a prompt and its new tokens (`cells` in all), or None while every one is taken."""
        if cells > self.kv_tokens:
            raise EzoError(f"a prompt and its max_tokens need {cells} tokens of KV cache; llamacpp.kv_tokens is "
                           f"{self.kv_tokens} per sequence")
        with self.lock:
            free = next((i for i in range(self.sequences) if i not in self.taken), None)
            if free is not None:
                self.taken.add(free)
            return free

    def release(self, slot: int) -> None:
        with self.lock:
            self.lib.llama_memory_seq_rm(self.memory, slot, -1, -1)  # its cells are free for the next
            self.taken.discard(slot)

    def start_from_shared(self, slot: int, prompt: list[int]) -> int:
        """Give `slot` the shared prefix's cells where the prompt starts with enough of it; how many it got (its
        prefill starts there). Callers hold `lock`."""
        n = min(common_start(prompt, self.shared), len(prompt) - 1)  # at least one token left to read logits from
        if n < MIN_SHARED:
            return 0
        self.lib.llama_memory_seq_cp(self.memory, self.sequences, slot, -1, -1)  # sequences on their own cells: whole
        self.lib.llama_memory_seq_rm(self.memory, slot, n, -1)
        return n

    def share(self, prompts: list[list[int]]) -> None:
        """Before prompts are prefilled together: what they all start with becomes the shared prefix, read once, where
        it is longer than the one held (synth's first prompts would each read the same instructions otherwise).
        Callers hold `lock`."""
        if len(prompts) < 2:
            return
        n = min(common_start(prompts[0], p) for p in prompts[1:])
        if n >= MIN_SHARED and n > common_start(prompts[0], self.shared):
            self.lib.llama_memory_seq_rm(self.memory, self.sequences, -1, -1)
            self.feed([(self.sequences, 0, prompts[0][:n])])
            self.shared = prompts[0][:n]

    def remember(self, slot: int, prompt: list[int]) -> None:
        """After `slot` has read `prompt`: make what it has in common with the previous prompt the shared prefix,
        where that is longer than what it shares with the present one. Callers hold `lock`."""
        n = common_start(prompt, self.last_prompt)
        self.last_prompt = prompt
        if n >= MIN_SHARED and n > common_start(prompt, self.shared):
            lib, shared = self.lib, self.sequences
            lib.llama_memory_seq_rm(self.memory, shared, -1, -1)
            lib.llama_memory_seq_cp(self.memory, slot, shared, -1, -1)
            lib.llama_memory_seq_rm(self.memory, shared, n, -1)
            self.shared = prompt[:n]

    def feed(self, parts: list[tuple[int, int, list[int]]]) -> np.ndarray:
        """Put each (slot, first position, tokens) into its sequence's cache; the logits after each part's last
        token, one row per part. Callers hold `lock`."""
        lib, b = self.lib, self.batch
        logits = np.empty((len(parts), self.vocab_size), dtype=np.float32)
        reads: list[tuple[int, int]] = []  # (part, batch row) read after the current decode call

        def decode() -> None:
            if (rc := lib.llama_decode(self.ctx, b)) != 0:
                raise EzoError(f"llama.cpp failed to decode a batch (llama_decode returned {rc})")
            for part, row in reads:
                logits[part] = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, row), shape=(self.vocab_size,))
            reads.clear()
            b.n_tokens = 0

        b.n_tokens = 0
        # In slot order: with a KV stream per sequence, llama.cpp puts only consecutive sequence ids in one step of
        # the graph, so rows in another order decode in several steps (8 rows: 117 vs 65 ms a step here).
        for part, (slot, first, tokens) in sorted(enumerate(parts), key=lambda p: p[1][0]):
            for pos, token in enumerate(tokens, first):
                if b.n_tokens == self.batch_tokens:
                    decode()
                row, last = b.n_tokens, pos == first + len(tokens) - 1
                b.token[row], b.pos[row], b.n_seq_id[row], b.seq_id[row][0], b.logits[row] = token, pos, 1, slot, last
                b.n_tokens += 1
                if last:
                    reads.append((part, row))
        decode()
        return logits


class Slots:
    """The batching loop's decoder on llama.cpp: each request is one sequence of the engine's context."""

    def __init__(self, engine: Engine, max_batch: int):
        self.engine, self.max_rows = engine, min(max_batch, engine.sequences)
        self.slot: dict[Job, int] = {}

    def admit(self, job: Job, rows: list[Job]) -> bool:
        slot = self.engine.claim(len(job.prompt) + job.sampling.max_new_tokens)  # raises when it never fits
        if slot is None:
            return False
        self.slot[job] = slot
        return True

    def step(self, rows: list[Job], joining: list[Job]) -> np.ndarray:
        engine = self.engine
        engine.share([j.prompt for j in joining])
        starts = [engine.start_from_shared(self.slot[j], j.prompt) for j in joining]
        # One packed feed: short prompts joining together prefill in one decode call, not one call each.
        logits = engine.feed([(self.slot[j], len(j.prompt) + len(j.out) - 1, [j.out[-1]]) for j in rows] +
                             [(self.slot[j], start, j.prompt[start:]) for j, start in zip(joining, starts)])
        for job in joining:
            engine.remember(self.slot[job], job.prompt)
        return logits

    def drop(self, rows: list[Job], gone: list[int]) -> None:
        for i in gone:
            self.engine.release(self.slot.pop(rows[i]))

    def reset(self) -> None:
        for slot in self.slot.values():
            self.engine.release(slot)
        self.slot.clear()


def common_start(a: list[int], b: list[int]) -> int:
    """How many tokens two lists have in common from the start."""
    n = min(len(a), len(b))
    mismatch = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(mismatch[0]) if mismatch.size else n


def resolve_threads(setting: str | int) -> int:
    if setting != "auto":
        return int(setting)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    n, source = (int(omp), "OMP_NUM_THREADS") if omp.isdigit() and int(omp) > 0 else (os.cpu_count() or 1, "cores")
    log.info("llamacpp.threads=auto: %d (%s); llama.cpp's threads spin while they wait, so set fewer when other work "
             "shares the cores", n, source)
    return n


def generation_config(spec: str):
    """The model's generation config, as transformers gives it to a loaded model: its file, else its config's."""
    from transformers import AutoConfig, GenerationConfig

    source = resolve(spec)
    try:
        return GenerationConfig.from_pretrained(source)
    except OSError:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(source))


class LlamaCppGenerator(ChatEngine):
    """A GGUF on llama.cpp for `ezo generate`, `chat`, `serve`, a local judge and the llamacpp backend: every request
    goes through the continuous-batching loop, several sequences decoding together in one context. Sampling is
    transformers' generate's (the model's top_k too), except under `ezo serve`, which samples alike on both engines."""

    def __init__(self, spec: str, tokenizer, context_length: int, cfg: LlamaCppConfig, sequences: int):
        generation = generation_config(spec)
        super().__init__(tokenizer, stop_token_ids(SimpleNamespace(generation_config=generation), tokenizer), spec,
                         min(context_length, cfg.kv_tokens))
        self.top_k = 50 if generation.top_k is None else generation.top_k  # transformers' default when unset
        self.engine = Engine(gguf_of(spec), resolve_threads(cfg.threads), cfg.kv_tokens, cfg.batch_tokens, sequences)
        self.lock = self.engine.lock

    def decoder(self, limits: ServeConfig) -> Slots:
        return Slots(self.engine, limits.max_batch)

    def close(self) -> None:
        self.engine.close()

    def answer(self, prompts: list[list[int]], sampling: Sampling,
               done: Callable[[int, Completion | Exception], None]) -> None:
        """Continue each prompt, all at once as the engine's sequences allow; `done(i, reply)` as each one ends (in
        the caller's thread)."""
        ended: queue.SimpleQueue = queue.SimpleQueue()
        batcher = Batcher(self, ServeConfig(max_batch=self.engine.sequences, max_queue=len(prompts)))
        try:
            batcher.submit_all(prompts, sampling, lambda i, e: None if isinstance(e, str) else ended.put((i, e)),
                               top_k=self.top_k)
            for _ in prompts:
                done(*ended.get())
        finally:
            batcher.close()

    def complete_text(self, texts: list[str], sampling: Sampling) -> list[Completion]:
        replies: list = [None] * len(texts)
        self.answer([self.encode(t) for t in texts], sampling, replies.__setitem__)
        if failed := next((r for r in replies if isinstance(r, Exception)), None):
            raise failed
        return replies

    def stream_text(self, text: str, sampling: Sampling) -> Iterator[str | Completion]:
        events: queue.SimpleQueue = queue.SimpleQueue()
        batcher = Batcher(self, ServeConfig(max_batch=1, max_queue=1))
        try:
            batcher.submit(self.encode(text), sampling, events.put, top_k=self.top_k)
            while not isinstance(event := events.get(), Completion):
                if isinstance(event, BaseException):
                    raise event
                yield event
            yield event
        finally:
            batcher.close()


def require_installed(setting: str) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError(f"{setting} is llamacpp but llama-cpp-python is not installed: {INSTALL} "
                          f"(`make install` tries it; it compiles llama.cpp), or set {setting} to transformers")


def check_convertible(spec: str) -> None:
    """A model folder our exporter cannot write as GGUF fails now, not after a stage has begun."""
    path = Path(spec).expanduser()
    if path.is_dir():
        from ezoforge import gguf_file

        gguf_file.check(path)


class LlamaCppBackend(LocalBackend):
    """A GGUF run by llama.cpp: the model's own GGUF (bundled, a .gguf file) as it is; a merged model folder or hub
    id through an f16 GGUF that our exporter writes once into the cache (`models.gguf_of`). It answers with a
    whole model: eval refuses base + adapter (merge first). The engine starts on the first `run`."""

    name = "llamacpp"

    @classmethod
    def build(cls, section: Section, target: Target) -> "LlamaCppBackend":
        require_installed(section.backend_setting)
        check_convertible(target.spec)
        return cls(*cls.local_model(section, target), target.spec, section.llamacpp, section.generation.batch_size)

    @classmethod
    def estimate(cls, section: Section, job: EngineJob) -> EngineEstimate:
        """The model as a GGUF in RAM (a .gguf file as it is, any other written once as f16 into the cache) beside
        `kv_tokens` of f16 KV cache for each sequence decoded together and one more (the shared prompt prefix)."""
        weights = weight_bytes(job.shape, "float16")
        cells = section.llamacpp.kv_tokens * (job.batch + 1)
        kv = cells * job.shape.kv_bytes_per_token
        source = (f"llama.cpp on the CPU: {weights / GIB:.1f} GiB of f16 weights (at most) + {kv / GIB:.2f} GiB of KV "
                  f"cache ({job.batch + 1} x {section.llamacpp.kv_tokens} tokens) + the process; its speed is the "
                  "CPU's (not planned)")
        return EngineEstimate(source, ram_gib=PROCESS_RAM_GIB + (weights + kv) / GIB,
                              disk_bytes=0.0 if job.spec.endswith(".gguf") else weights)

    def __init__(self, tokenizer, context_length: int, spec: str, cfg: LlamaCppConfig, sequences: int):
        super().__init__(tokenizer, min(context_length, cfg.kv_tokens))
        self.spec, self.cfg, self.sequences = spec, cfg, sequences
        self.gen: LlamaCppGenerator | None = None

    def generator(self) -> LlamaCppGenerator:
        if self.gen is None:
            self.gen = LlamaCppGenerator(self.spec, self.tokenizer, self.context_length, self.cfg, self.sequences)
        return self.gen

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()
            self.gen = None

    def run(self, reqs: list[Request], sampling: Sampling, done: Done) -> None:
        def finished(i: int, reply: Completion | Exception) -> None:
            if isinstance(reply, Exception):
                done(i, reply)
                return
            done(i, Completion(reqs[i].prefill + reply.text if reqs[i].prompt is None else reply.text,
                           reply.prompt_tokens, reply.completion_tokens, reply.finish_reason))

        self.generator().answer([self.prompt_ids(r) for r in reqs], sampling, finished)
