"""Recipe configuration: one pydantic model per stage, YAML + dotted overrides, fingerprints.

Every model forbids unknown keys so a typo fails before any work, naming the key path
(and the YAML line when the recipe came from a file).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ezoforge.errors import ConfigError

# The seed model card's own system prompt (Llama-3.1-70B-EZO-1.1-it).
DEFAULT_SYSTEM_PROMPT = "あなたは誠実で優秀な日本人のアシスタントです。特に指示が無い場合は、原則日本語で回答してください。"
BUNDLED_MODEL = "bundled:smollm2-135m-instruct"
STAGES = ("curate", "synth", "train", "merge", "eval")


OPERATIONAL = "operational"
T = TypeVar("T")
# A setting that changes how a stage runs, not what it writes (how often to log or save, workers, concurrency,
# timeouts, retries, inference batch sizes): left out of the folder's fingerprint (`output_settings`), so changing
# one never invalidates a folder and a resumed run simply picks up the new value. Marked on the field, where it is
# declared: `save_every: Operational[int] = 50`.
Operational = Annotated[T, OPERATIONAL]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    operational: ClassVar[frozenset[str]] = frozenset()  # the names of its Operational fields

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.operational = frozenset(name for name, field in cls.model_fields.items() if OPERATIONAL in field.metadata)


class BackendSettings(Section):
    """A backend's own subsection (`vllm`, `llamacpp`): its settings apply under that backend only."""

    backend: ClassVar[str]
    auto_picks: ClassVar[bool] = False  # whether a backend `auto` may pick it (its settings then stand)

    def refuse_unless(self, backend: str) -> None:
        """A stated setting under another backend would be ignored: refuse it."""
        default = type(self)()
        changed = [k for k in type(self).model_fields if getattr(self, k) != getattr(default, k)]
        if backend != self.backend and not (backend == "auto" and self.auto_picks) and changed:
            raise ValueError(f"{self.backend}.{changed[0]} is a {self.backend}-backend setting; backend '{backend}' "
                             "would ignore it")


class LlamaCppConfig(BackendSettings):
    """llama.cpp on the CPU (a `backend: llamacpp`, llama-cpp-python): one context decodes several sequences together
    (synth and eval: generation.batch_size; `ezo serve`: serve.max_batch), each with `kv_tokens` of KV cache."""

    backend = "llamacpp"
    auto_picks = True
    # All operational: how fast answers are computed. Like generation.batch_size, they change a reply only through
    # float rounding.
    # llama.cpp's threads spin while they wait: more threads than free cores is much slower, not a little.
    # auto: OMP_NUM_THREADS where set, else os.cpu_count() (logged)
    threads: Operational[Literal["auto"] | Annotated[int, Field(ge=1)]] = "auto"
    kv_tokens: Operational[int] = Field(4096, ge=256)  # KV cache of each sequence: its prompt and new tokens at most
    # tokens per decode call (n_batch): prompt chunks and one per sequence
    batch_tokens: Operational[int] = Field(512, ge=32)


class ModelConfig(Section):
    """The base model every stage starts from."""

    name: str = BUNDLED_MODEL
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    chat_template: Path | None = None
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    # quantize and backend (operational) change answers, but every cached answer is keyed by the model's identity and
    # the engine actually used; a stage that never loads the model this way (train) is not invalidated by them.
    # Weights of generate, chat, serve and eval's answers: bitsandbytes int8 or nf4 (double-quantized), or none;
    # auto: nf4 only where the weights at the load dtype do not fit the device (logged). Training has its own
    # setting (train.qlora).
    quantize: Operational[Literal["auto", "none", "nf4", "int8"]] = "auto"
    # What generate, chat and serve answer with: transformers, or llama.cpp (`llamacpp` settings: a whole model on the
    # CPU, its own GGUF or an f16 GGUF our exporter writes once). auto: llamacpp on a CPU where llama-cpp-python is
    # installed and the model needs no adapter or bitsandbytes, else transformers (logged).
    backend: Operational[Literal["auto", "transformers", "llamacpp"]] = "auto"
    llamacpp: Operational[LlamaCppConfig] = LlamaCppConfig()

    @model_validator(mode="after")
    def _engine_settings(self) -> "ModelConfig":
        self.llamacpp.refuse_unless(self.backend)
        return self


class GenerationConfig(Section):
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    batch_size: Operational[int] = Field(8, ge=1)
    seed: int = 0



# Curation thresholds. Sources: Swallow corpus v1 (Okazaki et al. 2024, "Building a Large Japanese Web Corpus
# for Large Language Models", quality filtering), FineWeb-2 `jpn_Jpan` (Penedo et al. 2025), llm-jp-corpus v1
# cleaning; "ours" where no published value fits character-level Japanese (see ezoforge/curate/ja_filters.py).

class Rule(Section):
    enabled: bool = True


class MojibakeRule(Rule):
    # ours: share of mojibake markers (U+FFFD, C1, Latin-1 letters, 縺繧繝). Mis-decoded pages score 0.3+;
    # a clean FineWeb-2 page on Bézier with French names scores 0.02.
    max_ratio: float = Field(0.05, ge=0, le=1)


class JapaneseRule(Rule):
    min_ratio: float = Field(0.5, ge=0, le=1)  # Swallow: Japanese characters ≥ 0.5


class LengthRule(Rule):
    min_chars: int = Field(400, ge=0)  # Swallow: ≥ 400 characters
    min_ja_chars: int = Field(400, ge=0)  # Swallow: ≥ 400 Japanese characters


class KanaRule(Rule):
    min_hiragana: float = Field(0.2, ge=0, le=1)  # Swallow
    max_katakana: float = Field(0.5, ge=0, le=1)  # Swallow


class SentenceRule(Rule):
    min_avg: float = Field(20, ge=0)  # Swallow: average sentence length 20–90
    max_avg: float = Field(90, ge=0)
    # Swallow: longest sentence ≤ 200, but 10 of JSQuAD's 91 Wikipedia articles (≥ 400 chars) have a genuine
    # 202–383-character sentence; 400 keeps clean encyclopedic text and still drops unpunctuated walls.
    max_len: int = Field(400, ge=1)


class EllipsisRule(Rule):
    max_ratio: float = Field(0.2, ge=0, le=1)  # Swallow: lines ending in an ellipsis ≤ 0.2


class DuplicatesRule(Rule):
    # Swallow (after Gopher): duplicate lines/paragraphs ≤ 0.30 by count, ≤ 0.20 by characters.
    # FineWeb-2 jpn_Jpan's duplicate-line fraction is 0.375, looser than Swallow's, so Swallow's applies.
    max_lines: float = Field(0.30, ge=0, le=1)
    max_line_chars: float = Field(0.20, ge=0, le=1)
    max_paragraphs: float = Field(0.30, ge=0, le=1)
    max_paragraph_chars: float = Field(0.20, ge=0, le=1)


# Swallow's n-gram rules come from Gopher, whose n counts words; without a tokenizer we count characters and
# take a Japanese word as 2 characters (UniDic short units average about that), so word n-gram -> 2n characters.
# At n characters (5..10) the rule dropped 57% of JSQuAD's Wikipedia articles; at 2n it keeps them.

class TopNgramRule(Rule):
    max_ratio: dict[int, float] = {4: 0.20, 6: 0.18, 8: 0.16}  # Swallow: top 2/3/4-gram share, as 2n characters


class DupNgramRule(Rule):
    # Swallow: characters in duplicated 5..10-grams ≤ 0.15 … 0.10, as 2n characters
    max_ratio: dict[int, float] = {10: 0.15, 12: 0.14, 14: 0.13, 16: 0.12, 18: 0.11, 20: 0.10}


class LinesRule(Rule):
    min_punct_lines: float = Field(0.12, ge=0, le=1)  # FineWeb line_punct_thr (FineWeb-2 keeps the rule)
    max_newline_ratio: float = Field(0.1, ge=0)  # ours: newlines per character (FineWeb: 0.3 per word)


class StopwordRule(Rule):
    words: list[str] = list("のにをはたてがとで年し・月れさ")  # FineWeb-2 jpn_Jpan stopwords
    min_count: int = Field(2, ge=0)  # Gopher / FineWeb-2: at least 2 stopwords


class NgWordRule(Rule):
    # Swallow drops pages by an NG-expression ratio; this short list and ratio are ours.
    words: list[str] = ["アダルト", "無修正", "出会い系", "セフレ", "エロ動画", "オンラインカジノ", "高収入",
                        "即金", "稼げる", "今すぐ登録", "激安", "最安値", "送料無料", "完全無料"]
    max_ratio: float = Field(0.03, ge=0, le=1)


class FiltersConfig(Section):
    """The Japanese quality filters, in the order they run (the first that fails names the reason)."""

    mojibake: MojibakeRule = MojibakeRule()
    japanese: JapaneseRule = JapaneseRule()
    kana: KanaRule = KanaRule()
    length: LengthRule = LengthRule()
    sentences: SentenceRule = SentenceRule()
    ellipsis: EllipsisRule = EllipsisRule()
    duplicates: DuplicatesRule = DuplicatesRule()
    top_ngram: TopNgramRule = TopNgramRule()
    dup_ngram: DupNgramRule = DupNgramRule()
    lines: LinesRule = LinesRule()
    stopwords: StopwordRule = StopwordRule()
    ng_words: NgWordRule = NgWordRule()


class NormalizeConfig(Section):
    nfkc: bool = True
    keep: str = "…‥！？～"  # NFKC would fold these to ASCII ("...", "!", "~"), changing Japanese typography
    strip_urls: bool = True  # llm-jp-corpus
    max_ascii_run: int | None = Field(100, ge=1)  # llm-jp-corpus strips long ASCII runs; the length is ours
    drop_lines_without_kana: bool = True  # llm-jp-corpus


class DedupConfig(Section):
    enabled: bool = True
    n_grams: int = Field(5, ge=1)  # Swallow: character 5-grams
    # Swallow: 20 bands x 20 rows; P(a Jaccard-0.9 pair shares a band) = 1 - (1 - 0.9**20)**20 = 0.925
    num_buckets: int = Field(20, ge=1)
    hashes_per_bucket: int = Field(20, ge=1)
    seed: int = 1


class ExecutorConfig(Section):
    """Which datatrove executor runs the passes: local processes, Slurm job arrays, or a Ray cluster."""

    kind: Literal["local", "slurm", "ray"] = "local"
    partition: str | None = None  # slurm
    time: str = "24:00:00"  # slurm time limit per task
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: float = Field(2, gt=0)
    gpus_per_task: int = Field(0, ge=0)  # GPUs each task is given (Slurm gres, Ray num_gpus): synth's vLLM engines
    venv_path: str | None = None  # slurm: venv to activate on the nodes
    job_name: str = "ezo-curate"
    sbatch_args: dict[str, str] = {}

    @model_validator(mode="after")
    def _slurm_partition(self) -> "ExecutorConfig":
        if self.kind == "slurm" and not self.partition:
            raise ValueError("executor 'slurm' needs partition")
        return self


class CurateConfig(Section):
    # `inputs` are fingerprinted by content (stage.input_fingerprints), not by how they were named.
    inputs: Operational[list[str]] = []
    workers: Operational[int] = Field(1, ge=1)
    on_error: Literal["fail", "skip"] = "fail"
    split_mb: float = Field(64, gt=0)  # inputs bigger than this are read as several strided shards (tasks)
    limit: int | None = Field(None, ge=1)  # documents read from each input, its first N (a smoke run, a sample)
    normalize: NormalizeConfig = NormalizeConfig()
    filters: FiltersConfig = FiltersConfig()
    dedup: DedupConfig = DedupConfig()
    executor: Operational[ExecutorConfig] = ExecutorConfig()


class PairFilters(Section):
    """What a synthesized pair must meet to be kept (lengths in characters)."""

    min_instruction_chars: int = Field(4, ge=1)
    max_instruction_chars: int = Field(500, ge=1)
    min_response_chars: int = Field(2, ge=1)
    max_response_chars: int = Field(2000, ge=1)
    min_japanese: float = Field(0.5, ge=0.0, le=1.0)  # share of letters that are kana or kanji
    max_copy_fraction: float = Field(0.8, gt=0.0, le=1.0)  # a verbatim run this share of the passage is a copy
    # Characters in repeated 10-character n-grams, Swallow's duplicate n-gram rule on one response (its limit for
    # long n-grams is 0.10 on whole documents; a short answer that lists parallel items repeats more honestly).
    max_repeated_fraction: float = Field(0.3, gt=0.0, le=1.0)


# What synth and eval answer through, by the name `synth.backend` and `eval.backend` take: each backend's class as
# "module:Class", imported only where a stage builds it or `ezo plan` asks for its estimate
# (`infer.registry.backend_class`). A new backend is its module and its line here (a backend's own settings, if it
# has any, go in both sections as a subsection like `vllm`).
BACKENDS = {
    "transformers": "ezoforge.infer.backends:TransformersBackend",
    "vllm": "ezoforge.infer.backends:VLLMBackend",
    "openai": "ezoforge.infer.backends:OpenAIBackend",
    "llamacpp": "ezoforge.infer.llamacpp:LlamaCppBackend",
}


def _known_backend(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: one of auto, {', '.join(BACKENDS)}")
    return name


# auto: llamacpp where llama.cpp can run the model on this CPU, else transformers (`infer.engines.pick_backend`, logged).
BackendChoice = Annotated[str, AfterValidator(_known_backend)]


class VLLMConfig(BackendSettings):
    """A vLLM engine (`synth.backend` or `eval.backend: vllm`). It claims `gpu_memory_utilization` of each card for
    the weights, its activations and the KV cache; what the weights leave must hold at least one context of KV cache
    (the section's `context_tokens`, vLLM's max_model_len). Quantization changes the answers; the rest changes only
    where and how fast they are computed (operational)."""

    tensor_parallel_size: Operational[int] = Field(1, ge=1)  # cards the weights are split over
    # none: the checkpoint's own dtype (an AWQ/GPTQ checkpoint declares itself); fp8: weights quantized to FP8 on
    # load (Hopper/Ada cards); bitsandbytes: 4-bit on load; awq/gptq: the checkpoint must be quantized so.
    quantization: Literal["none", "fp8", "bitsandbytes", "awq", "gptq"] = "none"
    gpu_memory_utilization: Operational[float] = Field(0.9, gt=0.0, le=1.0, allow_inf_nan=False)
    max_num_seqs: Operational[int] = Field(256, ge=1)  # sequences decoded together (when the KV cache holds them)
    enforce_eager: Operational[bool] = False  # no CUDA graphs: less memory, slower decoding

    backend = "vllm"


class SynthConfig(Section):
    model: str | None = None  # None: the recipe's base model
    backend: BackendChoice = "auto"
    base_url: str | None = None
    api_key_env: Operational[str | None] = None
    mode: Literal["prompted", "synthesizer"] = "prompted"
    pairs_per_doc: int = Field(3, ge=1)
    limit: int | None = Field(None, ge=1)
    concurrency: Operational[int] = Field(4, ge=1)
    # Upstream's synthesizer uses 400 new tokens; prompted pairs need fewer, and CPU runs of small models more so.
    generation: GenerationConfig = GenerationConfig(max_new_tokens=256)
    max_passage_tokens: int = Field(1024, ge=32)  # longer documents are split on sentence boundaries
    context_tokens: int | None = Field(None, ge=128)  # None: the model's own (openai backend: 4096, as upstream)
    tokenizer: str | None = None  # counts tokens for the openai backend; None: the served model's, when loadable
    timeout: Operational[float] = Field(120.0, gt=0)  # seconds per request (openai backend)
    max_retries: Operational[int] = Field(4, ge=0)
    max_error_fraction: float = Field(0.05, ge=0.0, le=1.0)  # more failed requests than this: the stage fails
    # transformers backend: static KV cache + compiled decode step (CUDA graphs). auto: on CUDA only (logged).
    static_cache: Operational[Literal["auto"] | bool] = "auto"
    vllm: VLLMConfig = VLLMConfig()  # backend vllm only; its max_model_len is context_tokens
    llamacpp: Operational[LlamaCppConfig] = LlamaCppConfig()  # backend llamacpp only
    filters: PairFilters = PairFilters()
    # The document draw: a seeded random order over all curated sources, nested (the first N of a larger limit are
    # the N of a smaller one). `mix` gives each source's share by the name curate writes in `source`; sources left
    # out are not drawn. None: every source in proportion to its documents.
    mix: dict[str, Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]] | None = None
    seed: int = 0
    # Scaling out: `workers` tasks, each synthesizing its slice of the requests on `executor` (curate's engines);
    # 1 on the local executor runs in this process.
    workers: Operational[int] = Field(1, ge=1)
    executor: Operational[ExecutorConfig] = ExecutorConfig(job_name="ezo-synth")

    @field_validator("mix")
    @classmethod
    def _shares(cls, mix: dict[str, float] | None) -> dict[str, float] | None:
        if mix is None:
            return None
        if not mix:
            raise ValueError("name at least one source, or leave mix unset")
        if abs(sum(mix.values()) - 1) > 1e-6:
            raise ValueError(f"shares sum to {sum(mix.values()):g}, not 1")
        return mix


    @model_validator(mode="after")
    def _openai_needs_url(self) -> "SynthConfig":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url")
        if self.backend != "transformers" and self.static_cache is True:
            raise ValueError(f"static_cache is a transformers-backend setting; backend '{self.backend}' decides its "
                             "own decoding (leave static_cache at auto, or state backend transformers)")
        self.vllm.refuse_unless(self.backend)
        self.llamacpp.refuse_unless(self.backend)
        return self


TrackerName = Literal["none", "tensorboard", "wandb", "mlflow"]


class TrainConfig(Section):
    # auto: 4-bit NF4 on CUDA where bitsandbytes trains, LoRA on a CPU (see train/model.py); true: 4-bit or an error.
    qlora: Literal["auto"] | bool = "auto"
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    learning_rate: float = Field(2e-4, gt=0.0)
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(2048, ge=16)
    packing: bool = True
    # Also learn each pair's source passage, as Instruction Pre-Training trains on the raw text with its pairs.
    # Off: plain SFT, loss on assistant tokens only (EZO's "plain instruction tuning").
    context_loss: bool = False
    # passage: the pairs synthesized from one passage train as one conversation (the passage and the first
    # instruction, then the other instructions as later turns), so the passage is read once, not once per pair;
    # a group longer than max_length is split into several conversations, each with the passage. none: one
    # conversation per pair. Pairs without a context train alone either way.
    group_pairs: Literal["passage", "none"] = "passage"
    # Checkpointing recomputes the same activations: it trades memory for time, never the result (operational).
    gradient_checkpointing: Operational[bool] = True
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    eval_every: int = Field(50, ge=1)  # held-out loss every N steps and after the last (what metrics.jsonl records)
    save_every: Operational[int] = Field(50, ge=1)
    keep_checkpoints: Operational[int] = Field(2, ge=1)
    log_every: Operational[int] = Field(1, ge=1)
    seed: int = 0
    target_modules: str | list[str] = "all-linear"
    liger: bool | None = None  # None: Liger kernels on CUDA when liger-kernel is installed
    # keep attention outputs, recompute the rest (with gradient_checkpointing)
    selective_checkpointing: Operational[bool] = False
    # checkpoint every n-th decoder layer: more speed for more memory
    checkpoint_every: Operational[int] = Field(1, ge=1)
    compile: bool = False  # torch.compile the model
    # Training on a CPU: matmuls in bfloat16 under autocast (weights, adapters and optimizer stay float32). auto: where
    # the CPU has bf16 instructions (AVX512-BF16, AMX), 1.5-1.8x faster steps on the bench CPU (logged); true: also
    # elsewhere (emulated, slower). A GPU run computes in the base's dtype.
    cpu_autocast: Literal["auto"] | bool = "auto"
    attn_implementation: str = "auto"  # auto: flash_attention_2 on CUDA when installed (padding-free), else sdpa
    # Each checkpointed layer's input waits in pinned host memory for its recompute (copies overlap compute).
    # auto: on CUDA when gradient_checkpointing is on; true: always (also on CPU, where it saves nothing); false: off.
    offload_activations: Operational[bool | Literal["auto"]] = "auto"

    # Experiment trackers the trainer logs to: none, tensorboard (event files in the train folder), wandb, mlflow.
    report_to: Operational[TrackerName | list[TrackerName]] = "none"

    @model_validator(mode="after")
    def _one_length(self) -> "TrainConfig":
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set max_steps or epochs, not both")
        return self

    @model_validator(mode="after")
    def _offload_needs_checkpointing(self) -> "TrainConfig":
        if self.offload_activations is True and not self.gradient_checkpointing:
            raise ValueError("offload_activations: true needs gradient_checkpointing: true (it offloads the "
                             "checkpointed layers' inputs)")
        return self


class SamplingConfig(GenerationConfig):
    """Generation that samples: several answers to one prompt must be able to differ."""

    temperature: float = Field(0.8, gt=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(0.95, gt=0.0, le=1.0, allow_inf_nan=False)


class PreferConfig(Section):
    """`ezo prefer`: preference pairs from the SFT model's own answers, graded by the recipe's judge (eval.judge_*),
    then DPO continuing the SFT adapter against the SFT model as the reference."""

    limit: int | None = Field(None, ge=1)  # instructions drawn (seeded, nested) from the pairs the SFT trained on
    samples: int = Field(4, ge=1)  # answers sampled per instruction from the SFT model
    include_reference: bool = True  # the synthesized response stands as one more candidate
    min_margin: float = Field(1.0, gt=0)  # keep (best, worst) only when their grades differ by at least this
    generation: SamplingConfig = SamplingConfig()
    seed: int = 0
    # DPO (TRL's DPOTrainer) on the kept pairs; the LoRA shape, quantization and attention are the SFT's (train.*).
    beta: float = Field(0.1, gt=0, allow_inf_nan=False)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                       "aot", "apo_zero", "apo_down", "sigmoid_norm"] = "sigmoid"
    learning_rate: float = Field(5e-5, gt=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(2, ge=1)  # pairs per step (each is two sequences)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=16)  # prompt + answer tokens; longer pairs are cut at the end
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # held-out pairs: DPO loss and log-prob margin before/after
    save_every: Operational[int] = Field(50, ge=1)
    keep_checkpoints: Operational[int] = Field(2, ge=1)
    log_every: Operational[int] = Field(1, ge=1)
    liger: bool | None = None  # None: Liger's layer kernels on CUDA when liger-kernel is installed


    @model_validator(mode="after")
    def _checks(self) -> "PreferConfig":
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set max_steps or epochs, not both")
        if self.samples == 1 and not self.include_reference:
            raise ValueError("one sampled answer and no reference make no pair: raise samples or include_reference")
        return self


# The rewards reinforce knows by name; any other name is a user's function, `module:function`.
REWARDS = ("judge", "japanese", "length", "reference")


class ReinforceConfig(Section):
    """`ezo reinforce`: GRPO (TRL's GRPOTrainer) continuing the SFT adapter (DPO's where prefer ran), against that
    adapter as the KL reference, on synth's instructions, with named, weighted rewards."""

    # name -> weight: judge, japanese, length, reference, module:function. A weight of 0 turns a reward off (`--set`
    # merges into the recipe's rewards, so `--set reinforce.rewards.judge=0` drops the judge).
    rewards: dict[str, float] = {"judge": 1.0}
    limit: int | None = Field(None, ge=1)  # instructions drawn (seeded) from the pairs the SFT trained on
    held_out: int = Field(8, ge=0)  # of those, prompts never trained on: rewards scored before and after
    num_generations: int = Field(4, ge=2)  # completions per prompt, the group each reward is normalized in
    max_completion_length: int = Field(256, ge=4)
    length_budget: int = Field(200, ge=1)  # `length`: 1 up to this many completion tokens, 0 at twice as many
    temperature: float = Field(0.9, gt=0.0, le=2.0, allow_inf_nan=False)
    beta: float = Field(0.04, ge=0.0, allow_inf_nan=False)  # KL to the starting policy (the SFT/DPO adapter)
    learning_rate: float = Field(5e-6, gt=0.0)
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)
    max_steps: int = Field(100, ge=1)
    epochs: None = None  # GRPO runs by steps (trainer_args reads the field)
    batch_size: int = Field(2, ge=1)  # prompts per step, each with num_generations completions
    grad_accum: int = Field(1, ge=1)
    # Where completions come from on a GPU: vLLM colocated with training (TRL's colocate mode), or transformers;
    # auto: vLLM where it is installed (logged). The CPU generates with transformers.
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    # vLLM's share of the card beside training: where it runs, not what it samples (as vllm.gpu_memory_utilization)
    vllm_gpu_memory_utilization: Operational[float] = Field(0.3, gt=0.0, lt=1.0)
    seed: int = 0
    save_every: Operational[int] = Field(25, ge=1)
    keep_checkpoints: Operational[int] = Field(2, ge=1)
    log_every: Operational[int] = Field(1, ge=1)
    liger: bool | None = None

    @model_validator(mode="after")
    def _checks(self) -> "ReinforceConfig":
        if not self.active:
            raise ValueError("rewards: give at least one reward a weight (judge, japanese, length, reference, "
                             "module:function)")
        for name, weight in self.rewards.items():
            if name not in REWARDS and not re.fullmatch(r"[\w.]+:\w+", name):
                raise ValueError(f"rewards.{name}: not a known reward ({', '.join(REWARDS)}) nor a `module:function`")
            if not math.isfinite(weight):
                raise ValueError(f"rewards.{name}: the weight must be a finite number")
        return self

    @property
    def active(self) -> dict[str, float]:
        """The rewards that count: those with a weight other than 0, in the recipe's order."""
        return {name: weight for name, weight in self.rewards.items() if weight != 0}


class MergeConfig(Section):
    # The merged model's stored dtype; `auto` keeps the base's.
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "bfloat16"


class EvalConfig(Section):
    tasks: list[str] = ["elyza100"]
    # Any OpenAI-compatible base URL, or "local": serve judge_model in-process. Not operational: another server may
    # hold another model under the same name.
    judge_url: str | None = None
    judge_model: str | None = None
    # What a `local` judge runs on (its settings are llama.cpp's defaults); auto: as model.backend's auto (logged).
    judge_backend: Literal["auto", "transformers", "llamacpp"] = "auto"
    judge_api_key_env: Operational[str | None] = None
    judge_max_tokens: int = Field(512, ge=16)
    # Send the verdict's JSON schema as `response_format` (OpenAI structured outputs; vLLM and `ezo serve`
    # enforce it while decoding). Off for a server that rejects response_format.
    judge_structured: bool = True
    judge_reason_max_chars: int = Field(400, ge=10)  # the schema's bound on "reason", so a verdict always ends
    judge_reasks: int = Field(2, ge=0)  # follow-up requests after an unparseable verdict
    judge_max_retries: Operational[int] = Field(4, ge=0)  # transport retries per request (backoff + jitter)
    judge_timeout: Operational[float] = Field(120.0, gt=0)
    limit: int | None = Field(None, ge=1)
    concurrency: Operational[int] = Field(4, ge=1)
    allow_partial: bool = False
    generation: GenerationConfig = GenerationConfig(max_new_tokens=512)
    # A task's score is the mean over `samples` answers (at generation.temperature) x `judgments` verdicts on each
    # (at judge_temperature); flexeval's ELYZA-tasks-100 protocol is 3 x 3. Each index has its own cache entry.
    samples: int = Field(1, ge=1)
    judgments: int = Field(1, ge=1)
    judge_temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False)  # FastChat and ours: 0
    # Reference answers (FastChat answer format, e.g. Japanese MT-Bench reference_answer/*.jsonl) for the
    # math/reasoning/coding questions of mt-bench-ja; a question's own `reference` field wins.
    mt_bench_references: Path | None = None
    jcqa_normalization: Literal["sum", "per_char"] = "sum"
    ppl_window: int = Field(1024, ge=8)  # tokens per scored window of a long paragraph
    bootstrap_samples: int = Field(1000, ge=100)
    bootstrap_seed: int = 0
    cache: Operational[Path | None] = None  # None: EZO_CACHE_DIR (or ~/.cache/ezoforge)/eval-requests.sqlite
    # Before judging, each task's input and reference are looked up in the training pairs and the curated documents
    # behind the evaluated model (eval/contamination.py): warn lists the tasks found, fail stops naming them.
    # `ezo run`: after the evals, the tuned model against the base (and the SFT model) head to head by the judge
    # (`ezo eval compare --pairwise`): a step of its own, so no eval's output changes with it.
    pairwise: Operational[bool] = False
    contamination: Literal["warn", "fail", "off"] = "warn"
    contamination_n: int = Field(13, ge=4)  # characters per n-gram
    contamination_threshold: float = Field(0.5, gt=0.0, le=1.0)  # share of a text's n-grams found in training text
    # Where open tasks' answers come from, through synth's backends: the model loaded here (transformers), a vLLM
    # engine here (vllm: `vllm` settings, a merged model), llama.cpp on the CPU (llamacpp: `llamacpp` settings, a
    # merged model or a GGUF), or an OpenAI-compatible server holding model.name (openai: base_url). Choice and
    # perplexity tasks score with the model's own forward pass, loaded here once a vLLM engine has been shut down.
    backend: BackendChoice = "auto"
    base_url: str | None = None
    api_key_env: Operational[str | None] = None
    timeout: Operational[float] = Field(120.0, gt=0)  # seconds per request (openai backend)
    max_retries: Operational[int] = Field(4, ge=0)
    vllm: VLLMConfig = VLLMConfig()
    llamacpp: Operational[LlamaCppConfig] = LlamaCppConfig()
    context_tokens: int | None = Field(None, ge=128)  # vllm's max_model_len; None: the model's own, at most 8192

    @model_validator(mode="before")
    @classmethod
    def _judge_temperature(cls, data: Any) -> Any:
        """A judge that takes only its default temperature samples at 1, as reports and cache keys then record (so
        its repeated verdicts differ); a stated other temperature is refused, naming it."""
        if not isinstance(data, dict) or not default_temperature_only(str(data.get("judge_model") or "")):
            return data
        stated = data.get("judge_temperature")
        if stated is not None and float(stated) != 1.0:
            raise ValueError(f"judge_temperature={stated}, but {data['judge_model']} takes only its default "
                             "temperature (1; OpenAI's reasoning models refuse any other): leave "
                             "eval.judge_temperature unset or set it to 1")
        return {**data, "judge_temperature": 1.0}

    @model_validator(mode="after")
    def _judge_pair(self) -> "EvalConfig":
        if bool(self.judge_url) != bool(self.judge_model):
            raise ValueError("judge_url and judge_model go together")
        if self.pairwise and not self.judge_model:
            raise ValueError("pairwise: true needs a judge to ask: set judge_url and judge_model")
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url")
        self.vllm.refuse_unless(self.backend)
        self.llamacpp.refuse_unless(self.backend)
        # Repeats that cannot differ would only shrink the spread and the interval: refuse them.
        if self.samples > 1 and self.generation.temperature == 0:
            raise ValueError(f"samples={self.samples} with generation.temperature=0: greedy decoding gives the same "
                             "answer every time; set eval.generation.temperature > 0 or samples=1")
        if self.judgments > 1 and self.judge_temperature == 0:
            raise ValueError(f"judgments={self.judgments} with judge_temperature=0 asks for one verdict "
                             f"{self.judgments} times; set eval.judge_temperature > 0 or judgments=1")
        return self


def default_temperature_only(model: str) -> bool:
    """OpenAI's reasoning models (the o-series, the gpt-5 family but its chat models): they take
    `max_completion_tokens`, not `max_tokens`, and refuse a temperature (or top_p) other than the default, 1."""
    name = model.rsplit("/", 1)[-1].lower()
    return re.match(r"(o\d|gpt-5)", name) is not None and not name.startswith("gpt-5-chat")


# ---------------------------------------------------------------- export

class ExportConfig(Section):
    """`ezo export`: a publishable folder (weights, tokenizer, model card) and optional GGUF files."""

    gguf: list[Literal["f16", "q8_0"]] = []
    repo: str | None = None  # USER/NAME the card's usage snippet loads (None: the export folder's own path)


# ---------------------------------------------------------------- serve (`ezo serve` limits; all operational)

class ServeConfig(Section):
    max_batch: Operational[int] = Field(16, ge=1)  # requests decoded together; more wait in the queue
    # requests waiting for a place; one more gets 429 with Retry-After
    max_queue: Operational[int] = Field(64, ge=0)
    max_body_bytes: Operational[int] = Field(1 << 20, ge=1024)  # a larger request body gets 413
    request_timeout: Operational[float] = Field(600.0, gt=0, allow_inf_nan=False)  # seconds from arrival to last token
    # Prompt tokens (padded) prefilled in one forward pass when requests join: one pass over 14 judge prompts of
    # ~1,400 tokens was slower on a CPU than one pass each (bench/judge_bench.py); short prompts still share one.
    max_prefill_tokens: Operational[int] = Field(2048, ge=1)



class Recipe(Section):
    """A whole run: the model, each stage's settings and where outputs go."""

    workdir: Path = Path("runs/default")
    # export and prefer (between train and merge): opt-in
    stages: list[Literal["curate", "synth", "train", "prefer", "reinforce", "merge", "eval", "export"]] = list(STAGES)
    model: ModelConfig = ModelConfig()
    generation: GenerationConfig = GenerationConfig()
    curate: CurateConfig = CurateConfig()
    synth: SynthConfig = SynthConfig()
    train: TrainConfig = TrainConfig()
    prefer: PreferConfig = PreferConfig()
    reinforce: ReinforceConfig = ReinforceConfig()
    merge: MergeConfig = MergeConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _prefer_needs_a_judge(self) -> "Recipe":
        # Checked here, so `ezo run` fails before curating and training, not at the prefer stage.
        if "prefer" in self.stages and not self.eval.judge_model:
            raise ValueError("stage prefer grades answers with the recipe's judge: set eval.judge_url and "
                             "eval.judge_model")
        if "reinforce" in self.stages and "judge" in self.reinforce.active and not (
                self.eval.judge_url and self.eval.judge_model):
            raise ValueError("reinforce.rewards.judge grades completions with the recipe's judge: set eval.judge_url "
                             "and eval.judge_model, or drop that reward")
        return self


# ---------------------------------------------------------------- loading

def _dotted(key: str, value: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return tree


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """`train.max_steps=10` -> {"train": {"max_steps": 10}}; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=10")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
        try:
            tree = deep_merge(tree, _dotted(key.strip(), value), strict=True)
        except ValueError:
            raise ConfigError(f"--set {item!r}: {key.strip()} clashes with another --set") from None
    return tree


def deep_merge(base: dict[str, Any], extra: dict[str, Any], strict: bool = False) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value, strict)
        elif strict and key in out and (isinstance(value, dict) or isinstance(out[key], dict)):
            raise ValueError(key)
        else:
            out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{self.name}:{line}: duplicate key '{key}' (first at line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                sub = path + (key_node.value,)
                lines[sub] = key_node.start_mark.line + 1
                walk(value_node, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _paths(tree: dict[str, Any], prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in tree.items():
        out += _paths(value, prefix + (key,)) if isinstance(value, dict) and value else [prefix + (key,)]
    return out


def format_validation_error(err: ValidationError, source: str = "recipe", lines: dict | None = None,
                            origins: dict[tuple, str] | None = None) -> str:
    """One line per problem, each naming where the value came from: `--set KEY=VALUE`, a flag, or FILE:LINE."""
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        where = source
        for n in range(len(loc), 0, -1):  # the deepest key given on the command line, else in the file
            if origins and loc[:n] in origins:
                where = origins[loc[:n]]
                break
            if lines and loc[:n] in lines:
                where = f"{source}:{lines[loc[:n]]}"
                break
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append(f"{where}: {key}: {msg}")
    return "\n".join(out)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None, flag_names: dict[str, str] | None = None) -> Recipe:
    """Load a recipe (or defaults when path is None), apply `extra` (from CLI flags, dotted key -> value; named in
    errors by `flag_names`) then --set overrides."""
    data: dict[str, Any] = {}
    lines: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a folder, not a recipe file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text (UTF-8) recipe file") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read recipe: {e.strerror}") from e
        try:
            loader = _UniqueKeyLoader(text)
            loader.name = str(path)
            try:
                data = loader.get_single_data() or {}
            finally:
                loader.dispose()
            lines = _yaml_lines(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}:1: a recipe is a mapping of sections, got {type(data).__name__}")
    origins: dict[tuple, str] = {}
    flags: dict[str, Any] = {}
    for dotted, value in (extra or {}).items():
        if value is not None:
            flags = deep_merge(flags, _dotted(dotted, value))
            name = (flag_names or {}).get(dotted, "--" + dotted.rsplit(".", 1)[-1].replace("_", "-"))
            origins[tuple(dotted.split("."))] = f"flag {name}"
    for item in overrides or []:
        key = item.partition("=")[0].strip()
        origins[tuple(key.split("."))] = f"--set {item}"
    data = deep_merge(deep_merge(data, flags), parse_overrides(overrides))
    for loc in _paths(parse_overrides(overrides)):  # a typo'd section named by the --set that made it
        for n in range(1, len(loc)):
            origins.setdefault(loc[:n], origins.get(loc, ""))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, lines, origins)) from None
    recipe.curate.inputs = [bundled_data(p) for p in recipe.curate.inputs]
    recipe.eval.tasks = [_expand_task(t) for t in recipe.eval.tasks]
    return recipe


BUNDLED_DATA = "bundled:"


def bundled_data(path: str) -> str:
    """`bundled:web/fineweb-demo.parquet` -> the file shipped in ezoforge/data (works from any install)."""
    if not path.startswith(BUNDLED_DATA) or path == BUNDLED_MODEL:
        return path
    return str(Path(__file__).parent / "data" / path[len(BUNDLED_DATA):])


def _expand_task(spec: str) -> str:
    name, sep, rest = spec.partition(":")
    return f"{name}:{bundled_data(rest)}" if sep else spec


# ---------------------------------------------------------------- identity and saving

# Whole key names only: `hf_token` is a secret, `max_new_tokens` is not.
_SECRET_KEY = re.compile(r"(^|_)(api_key|token|secret|password)$", re.I)


def redact(obj: Any) -> Any:
    """Drop secret values: recipes name environment variables (`*_env`), never hold keys."""
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) and v is not None else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def secret(var: str, what: str) -> str:
    """A key or token, read only from the environment variable a recipe or flag names, so it is never in a recipe,
    a saved config or a log; unset or empty is an error that names `what` asked for it."""
    value = os.environ.get(var, "")
    if not value:
        raise ConfigError(f"{what}: environment variable {var} is not set or empty")
    return value


def to_plain(model: BaseModel) -> dict[str, Any]:
    return json.loads(model.model_dump_json())


def output_settings(section: Section) -> dict[str, Any]:
    """The section's plain values without its (and its subsections') operational keys: what shapes the output."""
    plain = to_plain(section)
    return {name: output_settings(value) if isinstance(value := getattr(section, name), Section) else plain[name]
            for name in type(section).model_fields if name not in section.operational}


def fingerprint(*parts: Any) -> str:
    """A stable hash of configs/values; changes whenever any setting that shapes the output changes."""
    blob = json.dumps([to_plain(p) if isinstance(p, BaseModel) else p for p in parts],
                      sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Key paths whose values differ between two plain configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += diff_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".") or "(value)"]


def dump_yaml(model: BaseModel) -> str:
    return yaml.safe_dump(redact(to_plain(model)), allow_unicode=True, sort_keys=False)
