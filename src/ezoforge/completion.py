"""How any engine answers (transformers, llama.cpp, vLLM, a served endpoint): the one protocol (`Engine`) and the one
result type (`Completion`) that synth, eval, prefer, reinforce, `ezo generate`, chat, serve and the judge read."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass
class Completion:
    text: str  # for a synth request the backend prefilled, the prefill followed by the completion: what it parses
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"; a server's own word where it sent one
    model: str | None = None  # a served model as the server reports it answered (OpenAI: the dated version)
    system_fingerprint: str | None = None

    def cached(self) -> dict:
        """What an answer cache stores of it (cache.answer_key's value)."""
        return {"text": self.text, "finish_reason": self.finish_reason, "completion_tokens": self.completion_tokens}


@runtime_checkable
class Engine(Protocol):
    """What every way of answering offers, local or served. The answering surfaces are both engines:
    `infer.generate.ChatEngine` (a local model: transformers' `Generator`, llama.cpp's; `ezo generate`, chat, serve,
    a local judge, prefer's samples, reinforce's scores) and `infer.backends.Backend` (a way synth and eval answer:
    transformers, vLLM, llama.cpp, an OpenAI-compatible server; synth also sends it prefilled `run` requests). A
    served judge is reached over the same OpenAI protocol `ezo serve` speaks."""

    context_length: int  # tokens a conversation and its answer may take together

    def complete(self, conversations: list[list[dict[str, str]]], sampling: Any) -> list[Completion]:
        """Whole conversations answered in order (`sampling`: `infer.generate.Sampling`)."""

    def count_tokens(self, text: str) -> int:
        """The model's tokens in `text`."""

    def close(self) -> None:
        """Give back what the engine holds beyond what garbage collection frees."""
