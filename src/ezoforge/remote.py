"""Calls to any OpenAI-compatible chat endpoint (our `ezo serve`, `vllm serve`, a hosted API).

Retries come from the official client: connection errors, timeouts, 408, 409, 429 and 5xx are retried
with exponential backoff and jitter, honouring Retry-After; other 4xx fail at once. A call that still
fails raises RemoteError: callers record it as an error, never as text.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ezoforge.completion import Completion
from ezoforge.config import default_temperature_only, secret
from ezoforge.errors import EzoError

if TYPE_CHECKING:  # imported by the calls: stages import this module on machines without the client (a bare GPU image)
    import openai


class RemoteError(EzoError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def make_client(base_url: str, api_key_env: str | None = None, timeout: float = 120.0,
                max_retries: int = 4) -> openai.OpenAI:
    import openai

    key = secret(api_key_env, f"api_key_env {api_key_env}") if api_key_env else "none"
    return openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=max_retries)


def chat(client: openai.OpenAI, model: str, messages: list[dict[str, str]], max_tokens: int,
         temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
         stop: tuple[str, ...] = (), response_format: dict | None = None,
         extra_body: dict | None = None) -> Completion:
    """`extra_body`: request fields outside OpenAI's API (vLLM's `continue_final_message`, ...). A reasoning model
    (config.default_temperature_only) gets `max_completion_tokens` and no sampling settings: it refuses them."""
    extra = {"response_format": response_format} if response_format else {}
    if default_temperature_only(model):
        sampling = {"max_completion_tokens": max_tokens}
    else:
        sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
    resp = _call(client, client.chat.completions.create, model=model, messages=messages, seed=seed,
                 stop=list(stop) or None, extra_body=extra_body, **sampling, **extra)
    choice = resp.choices[0]
    reply = _reply(choice.message.content, resp.usage, choice.finish_reason)
    reply.model, reply.system_fingerprint = resp.model or None, getattr(resp, "system_fingerprint", None)
    return reply


def complete(client: openai.OpenAI, model: str, prompt: str, max_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stop: tuple[str, ...] = ()) -> Completion:
    """A plain-text completion (`/v1/completions`), for base-format models such as an instruction synthesizer."""
    resp = _call(client, client.completions.create, model=model, prompt=prompt, max_tokens=max_tokens,
                 temperature=temperature, top_p=top_p, seed=seed, stop=list(stop) or None)
    choice = resp.choices[0]
    return _reply(choice.text, resp.usage, choice.finish_reason)


def _call(client: openai.OpenAI, create, **kwargs):
    import openai

    try:
        return create(**kwargs)
    except openai.APIStatusError as e:
        raise RemoteError(f"{client.base_url}: HTTP {e.status_code}: {_message(e)}", e.status_code) from None
    except openai.APITimeoutError:
        raise RemoteError(f"{client.base_url}: timed out after {client.max_retries} retries") from None
    except openai.APIConnectionError as e:
        raise RemoteError(f"{client.base_url}: cannot connect ({e.__cause__ or e})") from None


def _reply(text: str | None, usage, finish_reason: str | None) -> Completion:
    return Completion(text or "", usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
                      finish_reason or "stop")


def _message(e: openai.APIStatusError) -> str:
    body = e.body if isinstance(e.body, dict) else {}
    err = body.get("error", body) if isinstance(body, dict) else {}
    return (err.get("message") if isinstance(err, dict) else None) or str(e.message)
