"""Where completions come from: a local transformers model, vLLM (optional `gpu` extra), or any OpenAI-compatible
server. Every backend takes a list of Requests and reports each result (or the exception that ended it) through
`done(index, Completion | Exception)` as soon as it exists, so the caller can store it durably before the next one.
synth sends its Requests; eval's conversations go through `complete` (the shape of `Generator.complete`).

synth and eval pick a backend by name (`config.BACKENDS`, imported by `infer.registry.backend_class`) and make it
with `build(section, target)`: the stage's section (`synth` or `eval`, which share the backend keys) and the model it
answers with. `ezo plan` asks the same class for its share of the stage (`estimate`).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ezoforge.completion import Completion
from ezoforge.config import Section, VLLMConfig, output_settings
from ezoforge.errors import ConfigError, EzoError
from ezoforge.infer.generate import Generator, Sampling, as_finish_reason
from ezoforge.models import Loaded
from ezoforge.sizing import (GIB, PROCESS_RAM_GIB, VLLM_GRAPHS_GIB, VLLM_OVERHEAD_GIB, VLLM_RAM_GIB, EngineEstimate,
                             EngineJob, decode_tokens_per_s, in_process_gib, in_process_words, weight_bytes)
from ezoforge.turns import chat_text

log = logging.getLogger(__name__)

Done = Callable[[int, "Completion | Exception"], None]


@dataclass(frozen=True)
class Request:
    """One model call: chat backends send `messages` (+ `prefill` where they can prefill the assistant turn),
    completion backends send `prompt`. `doc_id` and `passage` name what it was made from (synth's passage)."""

    doc_id: str
    passage: str
    messages: tuple[tuple[str, str], ...] | None = None
    prefill: str = ""
    prompt: str | None = None

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages or ()]


def as_requests(conversations: list[list[dict[str, str]]]) -> list[Request]:
    """eval's conversations as Requests: each one whole, nothing prefilled."""
    return [Request(str(i), "", messages=tuple((m["role"], m["content"]) for m in msgs))
            for i, msgs in enumerate(conversations)]


@dataclass(frozen=True)
class Target:
    """The model a stage answers with: its spec (for a served backend, the name the server knows), and what the
    stage decides about it."""

    spec: str
    chat_template: Path | None = None
    dtype: str = "auto"
    chat: bool = True  # requests are chat turns: a local tokenizer needs a chat template
    load: Callable[[], Loaded] | None = None  # the stage's own load of the weights (an in-process backend's model)
    tokenizer: str | None = None  # counts a served model's tokens (None: the model's own, where it loads here)
    max_context: int | None = None  # a local engine's context where the section states none (None: the model's)
    static_cache: bool = False  # transformers: the compiled static-cache decode (synth.static_cache, resolved)


class Backend:
    """A way to answer. A new one is a subclass with `build`, `run` and `estimate` (and `answer_settings` where
    settings beyond the model change its answers), plus its line in `config.BACKENDS`."""

    name: ClassVar[str]
    # Answers from a server: the model is a served name, known by it and the server's URL; nothing loads here.
    served: ClassVar[bool] = False
    # Answers with the stage's own load of the model (`Target.load`): an adapter applies, and eval scores
    # likelihoods with the same weights.
    in_process: ClassVar[bool] = False
    # Places and quantizes the weights itself (vLLM, on the GPU): a stage resolves no device or quantization for it
    # (models.check_model / model_identity with device None), so no CUDA is touched in its process before the
    # engine starts and the engine has the card to itself.
    own_device: ClassVar[bool] = False
    tokenizer = None  # the model's tokenizer where one counts its tokens here
    context_length: int = 4096  # tokens a request and its answer may take together

    @classmethod
    def build(cls, section: Section, target: Target) -> "Backend":
        raise NotImplementedError

    @classmethod
    def answer_settings(cls, section: Section) -> dict:
        """The section's settings, beyond the model and a server's URL, that change this backend's answers: cache
        keys name them."""
        return {}

    @classmethod
    def estimate(cls, section: Section, job: EngineJob) -> EngineEstimate:
        """What answering `job` takes of the machine, for `ezo plan`: every backend says it, none is guessed."""
        raise NotImplementedError(f"backend {cls.name!r} declares no estimate for ezo plan")

    def count_tokens(self, text: str) -> int:
        """Without a tokenizer, a token per character: about one per Japanese character or less."""
        return len(text)

    def request_tokens(self, req: Request) -> int:
        """The tokens a request sends (synth sizes its passages by them)."""
        return self.count_tokens(req.prompt if req.prompt is not None else
                                 "\n".join(c for _, c in req.messages or ()) + req.prefill)

    def run(self, reqs: list[Request], sampling: Sampling, done: Done) -> None:
        """Answer each request, reporting `done(index, Completion | Exception)` as soon as it is known."""
        raise NotImplementedError

    def complete(self, batch: list[list[dict[str, str]]], sampling: Sampling) -> list[Completion]:
        """Whole conversations answered, in order; the first failed request raises."""
        reqs = as_requests(batch)
        outs: list[Completion | Exception | None] = [None] * len(reqs)
        self.run(reqs, sampling, outs.__setitem__)
        if failed := next((o for o in outs if isinstance(o, Exception)), None):
            raise failed
        return outs

    def close(self) -> None:
        """Give back what the backend holds beyond what garbage collection frees (an engine's GPU memory)."""


class LocalBackend(Backend):
    """Shared by transformers and vLLM: we render prompts ourselves, so a chat request can end in a prefill.
    The model itself loads on the first `run`: a resumed run whose requests are all stored never loads it."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length

    @staticmethod
    def local_model(section: Section, target: Target) -> tuple:
        """The tokenizer and the context a local engine gets: the section's context_tokens, at most the model's."""
        from ezoforge.models import load_tokenizer, require_chat_template, spec_context_length

        tokenizer = load_tokenizer(target.spec, target.chat_template)
        if target.chat:
            require_chat_template(tokenizer, target.spec)
        context = min(spec_context_length(target.spec), section.context_tokens or target.max_context or 1 << 30)
        return tokenizer, context

    def render(self, req: Request) -> str:
        """The one rendering of a request for a local model (transformers and vLLM): what a server continuing the
        same messages renders too."""
        if req.prompt is not None:
            return req.prompt
        return chat_text(self.tokenizer, req.chat()) + req.prefill

    def prompt_ids(self, req: Request) -> list[int]:
        # The rendered text already holds the special tokens (BOS included where the model wants one).
        return self.tokenizer(self.render(req), add_special_tokens=False)["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def request_tokens(self, req: Request) -> int:
        return len(self.prompt_ids(req))


class TransformersBackend(LocalBackend):
    """Batched generation through our Generator. With `static_cache` (meant for CUDA) the KV cache is preallocated
    at a fixed size and transformers compiles the decode step (CUDA graphs), removing the per-step launch overhead
    that dominates batched decoding of 8B-class models."""

    name = "transformers"
    in_process = True

    @classmethod
    def build(cls, section: Section, target: Target) -> "TransformersBackend":
        return cls(*cls.local_model(section, target), target.load, section.generation.batch_size, target.static_cache)

    @classmethod
    def estimate(cls, section: Section, job: EngineJob) -> EngineEstimate:
        return EngineEstimate("transformers in the stage's process: " + in_process_words(job),
                              gpu_gib=in_process_gib(job), ram_gib=PROCESS_RAM_GIB + job.shard / GIB,
                              tokens_per_s=decode_tokens_per_s(job.card, job.shape, job.traffic, job.batch))

    def __init__(self, tokenizer, context_length: int, load: Callable[[], Loaded], batch_size: int,
                 static_cache: bool = False):
        super().__init__(tokenizer, context_length)
        self.load = load
        self.gen: Generator | None = None
        self.batch_size = batch_size
        self.static_cache = static_cache

    def generator(self) -> Generator:
        if self.gen is None:
            self.gen = Generator(self.load())
        return self.gen

    def complete(self, batch: list[list[dict[str, str]]], sampling: Sampling) -> list[Completion]:
        # Batched as the caller chunks them, in order.
        return self.generator().complete_text([self.render(r) for r in as_requests(batch)], sampling)

    def run(self, reqs: list[Request], sampling: Sampling, done: Done) -> None:
        self.generator()
        texts = [self.render(r) for r in reqs]
        lengths = [self.count_tokens(t) for t in texts]
        extra: dict = {}
        pad = None
        if self.static_cache:
            # One cache size and prompt widths in steps of 64 keep the compiled graphs few (one per batch shape).
            pad = 64
            ceiling = -(-max(lengths, default=0) // pad) * pad + sampling.max_new_tokens
            extra = {"cache_implementation": "static", "max_cache_len": -(-ceiling // 256) * 256}
        # Similar lengths batched together waste less compute on padding.
        order = sorted(range(len(reqs)), key=lambda i: -lengths[i])
        for start in range(0, len(order), self.batch_size):
            chunk = order[start: start + self.batch_size]
            outs = self.gen.complete_text([texts[i] for i in chunk], sampling, pad_to_multiple_of=pad, **extra)
            for i, c in zip(chunk, outs):
                done(i, Completion(reqs[i].prefill + c.text if reqs[i].prompt is None else c.text,
                               c.prompt_tokens, c.completion_tokens, c.finish_reason))


def vllm_engine_kwargs(model: str, dtype: str, seed: int, max_model_len: int, cfg: VLLMConfig) -> dict:
    """`vllm.LLM(**kwargs)` for a resolved model path and the recipe's engine settings."""
    kwargs = {"model": model, "dtype": dtype, "seed": seed, "max_model_len": max_model_len,
              "tensor_parallel_size": cfg.tensor_parallel_size, "gpu_memory_utilization": cfg.gpu_memory_utilization,
              "max_num_seqs": cfg.max_num_seqs, "enforce_eager": cfg.enforce_eager}
    if cfg.quantization != "none":
        kwargs["quantization"] = cfg.quantization
    if cfg.quantization == "bitsandbytes":
        kwargs["load_format"] = "bitsandbytes"  # vLLM releases before 0.8 need it said twice
    return kwargs


class VLLMBackend(LocalBackend):
    name = "vllm"
    own_device = True

    @classmethod
    def build(cls, section: Section, target: Target) -> "VLLMBackend":
        return cls(*cls.local_model(section, target), target.spec, target.dtype, section.generation.seed,
                   section.vllm)

    @classmethod
    def answer_settings(cls, section: Section) -> dict:
        return output_settings(section.vllm)  # on-load quantization

    @classmethod
    def estimate(cls, section: Section, job: EngineJob) -> EngineEstimate:
        """The engine takes gpu_memory_utilization of each card it spans and must hold one full context of KV cache
        beside the weights; how many sequences of `job.seq_tokens` decode at once sets its speed."""
        v, shape = section.vllm, job.shape
        scheme = job.dtype if v.quantization == "none" else v.quantization
        tp = v.tensor_parallel_size
        weights = weight_bytes(shape, scheme) / tp / GIB
        overhead = VLLM_OVERHEAD_GIB + (0 if v.enforce_eager else VLLM_GRAPHS_GIB)
        pool = v.gpu_memory_utilization * job.card.memory_gib
        kv = pool - weights - overhead
        kv_per_token = shape.kv_bytes_per_token / min(tp, shape.kv_heads) / GIB
        need = weights + overhead + job.context * kv_per_token  # vLLM refuses to start without one full context
        seqs = max(0.0, min(v.max_num_seqs, kv / (job.seq_tokens * kv_per_token)))
        source = (f"vLLM takes gpu_memory_utilization x the card ({pool:.1f} GiB): weights in {scheme} "
                  f"({weights:.1f} GiB per card), {overhead:g} GiB of context/activations/graphs, the rest KV cache "
                  f"({max(kv, 0):.1f} GiB, ~{seqs:.0f} sequences at once; one {job.context}-token context needs "
                  f"{job.context * kv_per_token:.1f} GiB)")
        fits = need <= pool
        return EngineEstimate(source, gpu_gib=pool if fits else need, ram_gib=VLLM_RAM_GIB + job.shard / GIB,
                              tokens_per_s=decode_tokens_per_s(job.card, shape, weight_bytes(shape, scheme),
                                                               max(seqs, 1), tp),
                              cards=tp, fits_gpu=fits)

    def __init__(self, tokenizer, context_length: int, spec: str, dtype: str, seed: int, cfg: VLLMConfig):
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("backend 'vllm' needs the gpu extra: pip install 'ezoforge[gpu]'")
        super().__init__(tokenizer, context_length)
        self.spec, self.dtype, self.seed, self.cfg = spec, dtype, seed, cfg
        self.llm = None

    def _engine(self):
        if self.llm is None:
            from vllm import LLM

            from ezoforge.models import resolve

            self.llm = LLM(**vllm_engine_kwargs(resolve(self.spec), self.dtype, self.seed, self.context_length,
                                                self.cfg))
        return self.llm

    def close(self) -> None:
        """Shut the engine down and give its GPU memory back: it holds gpu_memory_utilization of the card until
        then, and the next stage may run in this process."""
        if self.llm is None:
            return
        import gc

        import torch

        engine, self.llm = self.llm, None
        core = getattr(engine.llm_engine, "engine_core", None)  # vLLM V1: the engine runs in its own process
        if core is not None:
            core.shutdown()
        del engine
        try:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
        except ImportError:  # a vLLM without these holds no process group to end
            pass
        else:
            destroy_model_parallel()
            destroy_distributed_environment()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def run(self, reqs: list[Request], sampling: Sampling, done: Done) -> None:
        from vllm import SamplingParams

        llm = self._engine()
        params = SamplingParams(max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                top_p=sampling.top_p, seed=sampling.seed, stop=list(sampling.stop) or None)
        step = 512  # results reach the durable cache every few hundred prompts, not only at the very end
        for start in range(0, len(reqs), step):
            chunk = reqs[start: start + step]
            # Our own token ids: the synthesizer format must not get a second BOS.
            prompts = [{"prompt_token_ids": self.prompt_ids(r)} for r in chunk]
            for offset, res in enumerate(llm.generate(prompts, params, use_tqdm=False)):
                req, gen = chunk[offset], res.outputs[0]
                text = gen.text.strip()
                done(start + offset, Completion(req.prefill + text if req.prompt is None else text,
                                            len(res.prompt_token_ids), len(gen.token_ids),
                                            as_finish_reason(gen.finish_reason)))


# The request extension (vLLM's, `ezo serve`'s) that continues a final assistant message instead of opening a turn.
CONTINUE = {"continue_final_message": True, "add_generation_prompt": False}


class OpenAIBackend(Backend):
    """Concurrent requests to an OpenAI-compatible server. The prefill goes as a final assistant message that the
    server continues (`continue_final_message`, a request extension of vLLM and `ezo serve`), so the model sees
    the prompt a local backend renders. A server that rejects the extension (HTTP 400) is noticed on the first
    request; from then on the prefill is given in the user message as the text to continue from."""

    name = "openai"
    served = True

    @classmethod
    def build(cls, section: Section, target: Target) -> "OpenAIBackend":
        return cls(section.base_url, target.spec, section.api_key_env, section.timeout, section.max_retries,
                   section.concurrency, target.tokenizer, section.context_tokens or 4096)

    @classmethod
    def estimate(cls, section: Section, job: EngineJob) -> EngineEstimate:
        return EngineEstimate(f"served at {section.base_url}: no local GPU; its speed is the server's (not planned)")

    def __init__(self, base_url: str, model: str, api_key_env: str | None, timeout: float, max_retries: int,
                 concurrency: int, tokenizer: str | None, context_length: int):
        from ezoforge.remote import make_client

        self.client = make_client(base_url, api_key_env, timeout, max_retries)
        self.model = model
        self.concurrency = concurrency
        self.tokenizer_spec = tokenizer
        self.context_length = context_length
        self.continues: bool | None = None  # does the server continue a final assistant message? None: not known
        self._lock = threading.Lock()

    @functools.cached_property
    def tokenizer(self):
        """The served model's tokenizer, loaded on first use (eval never counts): the stated one, else the model's
        own where it loads here; None without one."""
        from ezoforge.models import load_tokenizer

        try:
            return load_tokenizer(self.tokenizer_spec or self.model)
        except (EzoError, OSError, ValueError) as e:
            if self.tokenizer_spec:
                raise
            log.warning("no tokenizer for %s (%s): counting one token per character, and synth's requests carry an "
                        "empty system message; set synth.tokenizer", self.model, e)
            return None

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            return super().count_tokens(text)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def request_tokens(self, req: Request) -> int:
        # The instructed form, the longer of the two: passages fit whichever the server takes.
        return self.count_tokens(req.prompt if req.prompt is not None else
                                 "\n".join(m["content"] for m in self.instructed(req)))

    @staticmethod
    def continued(req: Request) -> list[dict[str, str]]:
        """The prefill as a final assistant message, for a server that continues it (CONTINUE)."""
        return req.chat() + [{"role": "assistant", "content": req.prefill}]

    @staticmethod
    def instructed(req: Request) -> list[dict[str, str]]:
        """For a server without `continue_final_message`: the prefill as text to continue, in the user message."""
        msgs = req.chat()
        if req.prefill:
            msgs[-1] = {**msgs[-1], "content": f"{msgs[-1]['content']}\n\n次の続きを書いてください。\n{req.prefill}"}
        return msgs

    def _one(self, req: Request, sampling: Sampling) -> Completion:
        from ezoforge.remote import complete

        if req.prompt is not None:
            # A server tokenizes a completion prompt with its own BOS; the literal one would be doubled.
            reply = complete(self.client, self.model, req.prompt.removeprefix("<s> "), sampling.max_new_tokens,
                             sampling.temperature, sampling.top_p, sampling.seed, sampling.stop)
            text = reply.text
        elif req.prefill and self.continues is not False:
            reply, text = self._continued(req, sampling)
        else:
            reply, text = self._instructed(req, sampling)
        return Completion(text, reply.prompt_tokens, reply.completion_tokens, as_finish_reason(reply.finish_reason))

    def _continued(self, req: Request, sampling: Sampling):
        from ezoforge.remote import RemoteError, chat

        try:
            reply = chat(self.client, self.model, self.continued(req), sampling.max_new_tokens, sampling.temperature,
                         sampling.top_p, sampling.seed, sampling.stop, extra_body=CONTINUE)
        except RemoteError as e:
            if e.status != 400 or self.continues:
                raise
            try:  # a 400 that the instructed form does not get is the server refusing the extension
                answer = self._instructed(req, sampling)
            except RemoteError:
                raise e from None
            with self._lock:
                if self.continues is None:
                    log.warning("%s rejects continue_final_message (%s): the prefill goes in the user message "
                                "from now on, which small models follow less well", self.client.base_url, e)
                self.continues = False
            return answer
        self.continues = True
        return reply, req.prefill + reply.text  # as a local backend: the prefill, then what the model wrote

    def _instructed(self, req: Request, sampling: Sampling):
        from ezoforge.remote import chat

        reply = chat(self.client, self.model, self.instructed(req), sampling.max_new_tokens, sampling.temperature,
                     sampling.top_p, sampling.seed, sampling.stop)
        head = req.prefill.split(":", 1)[0]
        return reply, reply.text.strip() if reply.text.lstrip().startswith(head) else f"{req.prefill} {reply.text}"

    def run(self, reqs: list[Request], sampling: Sampling, done: Done) -> None:
        start = 0
        if reqs and reqs[0].prefill and self.continues is None:
            # The first request alone: its answer says whether the server continues a prefill.
            done(0, self._result(reqs[0], sampling))
            start = 1
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self._result, r, sampling): i for i, r in enumerate(reqs[start:], start)}
            try:
                for fut in as_completed(futures):
                    done(futures[fut], fut.result())
            except BaseException:
                for fut in futures:  # on Ctrl-C, send nothing more
                    fut.cancel()
                raise

    def _result(self, req: Request, sampling: Sampling) -> Completion | EzoError:
        try:
            return self._one(req, sampling)
        except EzoError as e:  # a request that failed after its retries: an error for its document
            return e
