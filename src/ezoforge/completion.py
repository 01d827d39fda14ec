"""One answer from any engine (transformers, llama.cpp, vLLM, a served endpoint): the one result type that synth,
eval, prefer, reinforce, `ezo generate`, chat, serve and the judge read."""
from __future__ import annotations

from dataclasses import dataclass


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
