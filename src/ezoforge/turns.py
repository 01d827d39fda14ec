"""A conversation as the model's chat template renders it: its token ids, which of them are the assistant's turns
(what training learns), the token that closes a turn (where a reply stops), and the system message a template
adds by itself.

Turn boundaries are found by rendering the conversation prefix by prefix with the model's own chat template, so no
`{% generation %}` markers are needed (where a template renders a turn otherwise once more follows, as Mistral's
moves its system prompt and Qwen3's drops an earlier reply's think block, the reply is found by its characters), and the end-of-turn token is labelled even when pad == eos (SmolLM2) —
masking pad ids would drop it and the model would never learn to stop.
"""
from __future__ import annotations

from ezoforge.errors import RecordError

IGNORE = -100  # the label of a token that is not learned


def chat_text(tokenizer, messages: list[dict[str, str]], generation_prompt: bool = True,
              continue_final: bool = False) -> str:
    """The one rendering of a conversation as the model's text, for training and for every local engine and backend:
    the chat template over each message's role and content, opening the assistant's turn (`generation_prompt`) or
    leaving the last, an assistant's, open to extend (`continue_final`)."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]  # a template sees role and content only
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt,
                                         continue_final_message=continue_final)


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    return tokenizer(chat_text(tokenizer, messages, generation_prompt), add_special_tokens=False)["input_ids"]


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    return ids


def encode(tokenizer, messages: list[dict[str, str]], specials: set[int] | None = None,
           context_loss: bool = False) -> dict[str, list[int]]:
    """Token ids of the whole conversation, and labels that keep only the assistant turns' tokens, each through
    its end-of-turn token (the last special token of the turn; what follows it, like a newline, is never generated).
    With `context_loss`, a user turn's source passage is learned too (Instruction Pre-Training's raw text)."""
    specials = special_ids(tokenizer) if specials is None else specials
    ids = _render(tokenizer, messages, False)
    labels = [IGNORE] * len(ids)
    if context_loss and any(m.get("context") for m in messages):
        _label_contexts(tokenizer, messages, ids, labels)
    text, offsets, after = None, None, 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if text is None:
            text = chat_text(tokenizer, messages, False)
        through_reply = chat_text(tokenizer, messages[: i + 1], False)
        if text.startswith(chat_text(tokenizer, messages[:i], True)) and text.startswith(through_reply):
            # Shared prefixes, not lengths: a prefix rendering may tokenize its last characters differently.
            start = _shared_prefix(_render(tokenizer, messages[:i], True), ids)
            end = _shared_prefix(_render(tokenizer, messages[: i + 1], False), ids)
            last_special = max((j for j in range(start, end) if ids[j] in specials), default=end - 1)
            after = len(through_reply)
        else:  # the template renders a turn otherwise once more follows (Mistral's system prompt, Qwen3's think block)
            if offsets is None:
                offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            start, end, after = _reply_tokens(text, offsets, m["content"], after, i)
            last_special = next((j for j in range(end, len(ids)) if ids[j] in specials), end - 1)
        labels[start:last_special + 1] = ids[start:last_special + 1]
    labels[0] = IGNORE  # a packed neighbour's last token must never predict this one
    return {"input_ids": ids, "labels": labels}


def _reply_tokens(text: str, offsets: list[tuple[int, int]], reply: str, after: int, turn: int) -> tuple[int, int, int]:
    """The tokens [start, end) that hold a reply, found by its characters in the rendered text from `after` on, and
    where the reply ends there."""
    content = reply.strip()  # templates often trim a reply
    at = text.find(content, after)
    if not content or at < 0:
        raise RecordError(f"message {turn}: the chat template does not render this reply as written, so its tokens "
                          "cannot be found to learn from")
    end_char = at + len(content)
    start = next(j for j, (_, b) in enumerate(offsets) if b > at)
    end = next((j for j, (a, _) in enumerate(offsets) if a >= end_char), len(offsets))
    return start, end, end_char


def length(tokenizer, messages: list[dict[str, str]]) -> int:
    """The conversation's token count as `encode` renders it, without labelling it."""
    return len(_render(tokenizer, messages, False))


def _label_contexts(tokenizer, messages: list[dict[str, str]], ids: list[int], labels: list[int]) -> None:
    """Label the tokens that lie wholly inside each passage, found by character offsets in the rendered text."""
    text = chat_text(tokenizer, messages, False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # the same tokens as `ids`
    at = 0
    for m in messages:
        if not m.get("context"):
            continue
        start = text.index(m["context"], at)
        at = end = start + len(m["context"])
        for j, (a, b) in enumerate(enc["offset_mapping"]):
            if start <= a < b <= end:
                labels[j] = ids[j]


def end_of_turn_id(tokenizer) -> int | None:
    """The token that closes an assistant turn in this chat template (`<|eot_id|>`, `<|im_end|>`, …)."""
    convo = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    enc = encode(tokenizer, convo)
    trained = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE]
    return trained[-1] if trained and trained[-1] in special_ids(tokenizer) else None


def default_system(tokenizer) -> str:
    """The system message this chat template puts in a conversation that has none: sent explicitly, it renders the
    same prompt, and no server adds a system prompt of its own. "" where the template adds none (or there is no
    template): an explicit empty message, which such a template renders as an empty system turn."""
    if not getattr(tokenizer, "chat_template", None):
        return ""
    marker, user = "<ezo-system>", [{"role": "user", "content": "?"}]
    head, _, tail = chat_text(tokenizer, [{"role": "system", "content": marker}, *user], False).partition(marker)
    plain = chat_text(tokenizer, user, False)
    if len(plain) >= len(head) + len(tail) and plain.startswith(head) and plain.endswith(tail):
        found = plain[len(head): len(plain) - len(tail)]
        if chat_text(tokenizer, [{"role": "system", "content": found}, *user], False) == plain:
            return found
    return ""
