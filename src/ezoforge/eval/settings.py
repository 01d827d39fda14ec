"""The `eval:` section of a recipe: the tasks, the judge, the backend that answers, and the statistics."""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ezoforge.config import (BackendChoice, GenerationConfig, LlamaCppConfig, Operational, Section, VLLMConfig,
                             bundled_task, default_temperature_only)


class EvalConfig(Section):
    backend_setting: ClassVar[str] = "eval.backend"  # where errors say `backend` is set

    tasks: list[str] = ["elyza100"]

    @field_validator("tasks")
    @classmethod
    def _bundled_tasks(cls, tasks: list[str]) -> list[str]:
        return [bundled_task(t) for t in tasks]

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
