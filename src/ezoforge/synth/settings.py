"""The `synth:` section of a recipe: the model and backend that answer, the prompt mode, and what a kept pair meets."""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ezoforge.config import (BackendChoice, ExecutorConfig, GenerationConfig, LlamaCppConfig, Operational, Section,
                             VLLMConfig)


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


class SynthConfig(Section):
    backend_setting: ClassVar[str] = "synth.backend"  # where errors say `backend` is set

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
