"""The two request formats: our versioned Japanese prompt (prompted mode) and Instruction Pre-Training's.

Prompted mode shows one complete worked example as an earlier conversation turn, then the new passage, and
prefills the reply with the first pair's instruction up to `回答1:`, so even a 135M model continues the pattern
instead of chatting. The example passage and pairs are ours, written for ezoforge. Bump PROMPT_VERSION whenever
the text changes: it is part of every cache key and of every pair's `generator` field.
"""
from __future__ import annotations

import hashlib

from ezoforge.infer.backends import Request

PROMPT_VERSION = "ja-pairs-v1"
SYNTHESIZER_VERSION = "ipt-synthesizer-v1"

INSTRUCTION = ("この文章について、質問と回答を{n}組作ってください。"
               "事実の質問、要約、理由の説明、言い換えなど、種類を変えてください。")

EXAMPLE_PASSAGE = "和紙は日本の伝統的な紙である。主な原料はコウゾの繊維で、薄くても破れにくい。現在も障子や書道に使われている。"

# Answers restate the passage in whole sentences: a small model then answers from the passage in front of it
# (measured on the bundled 135M model: 38% of documents kept a pair, against 12% with terse answers it copied).
EXAMPLE_PAIRS = (
    ("この文章の要点を説明してください。", "和紙は日本の伝統的な紙で、薄くても破れにくい。"),
    ("和紙の主な原料は何ですか。", "主な原料はコウゾの繊維です。"),
    ("和紙は現在、何に使われていますか。", "現在も障子や書道に使われています。"),
    ("和紙が薄くても破れにくいことを、別の言い方で説明してください。", "和紙は薄い紙ですが、丈夫で簡単には破れません。"),
    ("この文章を一文で要約してください。", "和紙はコウゾの繊維から作られる丈夫な日本の紙で、今も障子や書道に使われています。"),
)
# Words only the example uses: a pair that mentions one its passage lacks was copied from the example.
EXAMPLE_TERMS = ("和紙", "コウゾ", "障子", "書道")

# The first instruction is written for the model (rotating by passage), so even a tiny model only has to
# answer and continue the pattern; it also brings task types (summaries, key points) models rarely ask.
SEED_INSTRUCTIONS = (
    "この文章を一文で要約してください。",
    "この文章の要点を説明してください。",
    "この文章は何について書かれていますか。",
    "この文章から読み取れる事実を一つ挙げてください。",
)

QUESTION_MARK, ANSWER_MARK = "質問", "回答"


def format_pairs(pairs: tuple[tuple[str, str], ...]) -> str:
    return "\n".join(f"{QUESTION_MARK}{i}: {q}\n{ANSWER_MARK}{i}: {a}" for i, (q, a) in enumerate(pairs, 1))


def _ask(passage: str, n: int) -> str:
    return f"文章:\n{passage}\n\n{INSTRUCTION.format(n=n)}"


def prompted(doc_id: str, passage: str, n: int, system: str) -> Request:
    """`system` always goes as its own message, so no server's or template's default takes its place."""
    shown = EXAMPLE_PAIRS[: min(n, len(EXAMPLE_PAIRS))]
    seed = SEED_INSTRUCTIONS[int(hashlib.sha256(passage.encode()).hexdigest(), 16) % len(SEED_INSTRUCTIONS)]
    messages = (("system", system), ("user", _ask(EXAMPLE_PASSAGE, len(shown))), ("assistant", format_pairs(shown)),
                ("user", _ask(passage, n)))
    return Request(doc_id, passage, messages=messages, prefill=f"{QUESTION_MARK}1: {seed}\n{ANSWER_MARK}1:")


def stop_strings(mode: str, n: int) -> tuple[str, ...]:
    """Where a prompted answer is complete: the next pair past n, or the model starting a new passage."""
    return (f"{QUESTION_MARK}{n + 1}:", "文章:") if mode == "prompted" else ()


def synthesizer(doc_id: str, passage: str) -> Request:
    # Instruction Pre-Training's exact input: a literal "<s>" (the tokenizer maps it to BOS), leading space kept,
    # and the text tokenized without adding special tokens.
    return Request(doc_id, passage, prompt=f"<s> <CON> {passage} </CON>\n\n")
