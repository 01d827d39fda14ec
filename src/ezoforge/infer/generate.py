"""Chat-formatted generation: batched (left padding), streamed, and the JSONL batch command."""
from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ezoforge.completion import Completion, Engine
from ezoforge.models import Loaded, stop_token_ids
from ezoforge.records import RecordError, atomic_path, read_jsonl, require
from ezoforge.turns import chat_text


def finish_reason(stopped: bool, tokens: int, max_new_tokens: int) -> str:
    """Why a reply ended: "length" when the token limit cut it, else "stop" (an end of turn or a stop string)."""
    return "stop" if stopped or tokens < max_new_tokens else "length"


def as_finish_reason(reported: str | None) -> str:
    """Another engine's finish_reason (vLLM's, a server's) in the same two words: all but "length" is "stop"."""
    return "length" if reported == "length" else "stop"


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    json_schema: dict[str, Any] | None = None  # constrain the output to JSON valid under this schema

    @classmethod
    def from_config(cls, g, **extra: Any) -> "Sampling":
        """The one way a recipe's generation section (config.GenerationConfig) becomes sampling settings."""
        return cls(g.max_new_tokens, g.temperature, g.top_p, g.seed, **extra)


def build_messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def whole_chars(text: str) -> str:
    """Generated text ends at its last complete character: byte-level tokens can stop inside a multi-byte
    character, which decodes to U+FFFD at the very end. A U+FFFD followed by more text is real and stays."""
    return text.rstrip("\ufffd")


def completion(ids: list[int], prompt_tokens: int, eos_ids, decode, sampling: Sampling) -> Completion:
    """A local engine's generated ids as the reply: up to and including the first end-of-reply id, the text cut at
    the first stop string and ending in whole characters."""
    n, ended = len(ids), False
    for i, tok in enumerate(ids):
        if tok in eos_ids:
            n, ended = i + 1, True
            break
    text, stopped = _cut_at_stop(decode(ids[:n]), sampling.stop)
    return Completion(whole_chars(text).strip(), prompt_tokens, n,
                      finish_reason(ended or stopped, n, sampling.max_new_tokens))


class TextSoFar:
    """Generated token ids in, text out as it becomes final: never part of a character or of a stop string."""

    def __init__(self, decode, stop: tuple[str, ...]):
        self.decode, self.stop = decode, stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may still be completing
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token_id: int) -> str:
        """Take one token; return the text that is now safe to show."""
        self.ids.append(token_id)
        self.text, self.stopped = _cut_at_stop(self.decode(self.ids), self.stop)
        ready = len(whole_chars(self.text))
        return self._take(ready if self.stopped else ready - self.hold)

    def finish(self) -> str:
        """The rest, once generation has ended."""
        self.text = whole_chars(self.text)
        return self._take(len(self.text))

    def _take(self, ready: int) -> str:
        if ready <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent: ready], ready
        return piece


class ChatEngine:
    """What every engine that answers chats shares: the tokenizer side (chat template, ids, text, JSON-schema
    constraints) and the answering surface `ezo generate`, `chat` and `serve` use. Each engine adds `complete_text`,
    `stream_text`, and a `lock` its steps hold; an engine other than transformers adds the `decoder(limits)` its
    continuous batching runs on (`infer.batching.Decoder`; transformers' is `batching.PaddedCache`)."""

    lock: threading.Lock

    def __init__(self, tokenizer, eos_ids: list[int], name: str, context_length: int):
        self.tokenizer, self.eos_ids, self.name, self.context_length = tokenizer, eos_ids, name, context_length
        # A fast tokenizer is not safe to share across threads (padding/truncation settings are mutable state).
        self.tokenizer_lock = threading.RLock()

    def prompt_text(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> str:
        """The conversation as the model's text (`turns.prompt`); `continue_final_message` leaves the last
        (assistant) turn open to extend."""
        with self.tokenizer_lock:
            return chat_text(self.tokenizer, messages, add_generation_prompt, continue_final_message)

    def encode(self, text: str) -> list[int]:
        with self.tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    @functools.cached_property
    def structured(self):
        from ezoforge.infer.structured import TokenizerData

        return TokenizerData(self.tokenizer, self.eos_ids)

    def complete(self, batch: list[list[dict[str, str]]], sampling: Sampling) -> list[Completion]:
        return self.complete_text([self.prompt_text(m) for m in batch], sampling)

    def stream(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str | Completion]:
        return self.stream_text(self.prompt_text(messages), sampling)

    def complete_text(self, texts: list[str], sampling: Sampling) -> list[Completion]:
        raise NotImplementedError

    def stream_text(self, text: str, sampling: Sampling) -> Iterator[str | Completion]:
        """Yield text pieces as they are generated, then one final Completion with the totals."""
        raise NotImplementedError

    def close(self) -> None:
        """Give back what the engine holds beyond what garbage collection frees."""


class Generator(ChatEngine):
    """A transformers model; one request at a time (a lock), so concurrent callers queue safely."""

    def __init__(self, loaded: Loaded):
        super().__init__(loaded.tokenizer, stop_token_ids(loaded.model, loaded.tokenizer), loaded.name,
                         loaded.context_length)
        self.loaded = loaded
        self.model = loaded.model
        self.lock = threading.Lock()

    def _generate_kwargs(self, sampling: Sampling) -> dict:
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, eos_token_id=self.eos_ids,
                      pad_token_id=self.tokenizer.pad_token_id)
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        if sampling.json_schema is not None:
            kwargs["prefix_allowed_tokens_fn"] = self.structured.allowed_tokens_fn(sampling.json_schema)
        return kwargs

    def _encode(self, texts: list[str], pad_to_multiple_of: int | None = None):
        with self.tokenizer_lock:
            self.tokenizer.padding_side = "left"  # decoder-only batches pad on the left: every row ends at its prompt
            # The chat template already holds the special tokens (BOS included where the model wants one).
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                                 pad_to_multiple_of=pad_to_multiple_of)
        return {k: v.to(self.loaded.device) for k, v in enc.items()}

    def complete_text(self, texts: list[str], sampling: Sampling, pad_to_multiple_of: int | None = None,
                      **generate_kwargs) -> list[Completion]:
        """Complete raw prompts: chat-formatted ones (a prefilled assistant turn) or a base model's own format.
        `pad_to_multiple_of` and `generate_kwargs` (e.g. a static cache) let a caller keep shapes stable."""
        enc = self._encode(texts, pad_to_multiple_of)
        with self.lock, torch.inference_mode():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            out = self.model.generate(**enc, **self._generate_kwargs(sampling), **generate_kwargs)
        width = enc["input_ids"].shape[1]
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        return [completion(row, int(plen), self.eos_ids, self.decode, sampling)
                for row, plen in zip(out[:, width:].tolist(), prompt_lens)]

    def stream_text(self, text: str, sampling: Sampling) -> Iterator[str | Completion]:
        import queue

        from transformers.generation.streamers import BaseStreamer

        enc = self._encode([text])
        tokens: queue.SimpleQueue = queue.SimpleQueue()  # new token ids, then None at the end

        class Ids(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # generate() hands over the prompt first
                    self.first = False
                else:
                    tokens.put(value.reshape(-1).tolist())

            def end(self):
                tokens.put(None)

        result: dict = {}

        def work() -> None:
            with self.lock, torch.inference_mode():
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                try:
                    result["out"] = self.model.generate(**enc, **self._generate_kwargs(sampling), streamer=Ids())
                except BaseException as e:  # surfaced to the consumer below
                    result["error"] = e
                    tokens.put(None)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        so_far = TextSoFar(self.decode, sampling.stop)
        n, ended = 0, False
        while (ids := tokens.get()) is not None:
            for tok in ids:
                if ended or so_far.stopped:
                    continue  # drain so the worker finishes
                n += 1
                if tok in self.eos_ids:
                    ended = True
                elif piece := so_far.add(tok):
                    yield piece
        thread.join()
        if "error" in result:
            raise result["error"]
        if piece := so_far.finish():
            yield piece
        yield Completion(so_far.text, int(enc["input_ids"].shape[1]), n,
                         finish_reason(ended or so_far.stopped, n, sampling.max_new_tokens))


def generate_file(engine: Engine, input_path: Path, out_path: Path, system: str | None, sampling: Sampling,
                  batch_size: int = 8, identity: str = "") -> int:
    """`{"id", "prompt"}` lines in, `{"id", "prompt", "answer"}` lines out, in input order.

    Finished answers are appended to `OUT.partial` as each batch completes, each with the key of what determined
    it (`identity` of the model — weights, adapter, dtype, device, template — the messages and the sampling), so a
    killed run resumes where it stopped and an answer made under other settings is never reused.
    """
    from rich.progress import Progress

    from ezoforge.cache import answer_key
    from ezoforge.logs import console

    rows, seen = [], set()
    for lineno, obj in read_jsonl(input_path):
        prompt = require(input_path, lineno, obj, "prompt")
        row_id = str(obj.get("id", lineno))
        if row_id in seen:
            raise RecordError(f"{input_path}:{lineno}: duplicate id {row_id!r}")
        seen.add(row_id)
        messages = build_messages(prompt, system)
        rows.append({"id": row_id, "prompt": prompt, "messages": messages,
                     "key": answer_key(identity, messages, sampling)})
    partial = out_path.with_name(out_path.name + ".partial")
    done: dict[str, str] = {}
    if partial.exists():
        for _, obj in read_jsonl(partial, on_error="skip"):
            if isinstance(obj, dict) and "key" in obj:  # a torn last line from a kill is skipped and redone
                done[obj["key"]] = obj["answer"]
    todo = [r for r in rows if r["key"] not in done]
    with Progress(console=console) as progress, open(partial, "a", encoding="utf-8") as sink:
        task = progress.add_task("generating", total=len(rows), completed=len(rows) - len(todo))
        for i in range(0, len(todo), batch_size):
            chunk = todo[i: i + batch_size]
            outs = engine.complete([r["messages"] for r in chunk], sampling)
            for r, c in zip(chunk, outs):
                done[r["key"]] = c.text
                sink.write(json.dumps({"id": r["id"], "key": r["key"], "answer": c.text}, ensure_ascii=False) + "\n")
            sink.flush()
            progress.advance(task, len(chunk))
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"id": r["id"], "prompt": r["prompt"], "answer": done[r["key"]]}, ensure_ascii=False)
                    + "\n")
    partial.unlink()
    return len(rows)
