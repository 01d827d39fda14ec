"""Log-likelihood scoring with the model's own forward pass: JCommonsenseQA choices and held-out perplexity.

JCommonsenseQA: the question (with the five choices listed) is the user turn of the chat template; each choice's
text is scored as the assistant's reply: the sum of log P(choice tokens | prompt). `sum` picks the highest sum
(lm-evaluation-harness `acc`); `per_char` divides by the choice's length in characters (`acc_norm`, per character
rather than per byte because Japanese is 3 bytes a character in UTF-8). Both accuracies are reported.

Perplexity: each paragraph is tokenized as raw text (the tokenizer's own BOS, no chat template) and cut into
windows of `window` tokens that overlap by one, so every token after the first is predicted exactly once, from
the start of its window. Perplexity = exp(total NLL / total predicted tokens) over all paragraphs.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from ezoforge.eval.items import ChoiceItem
from ezoforge.infer.generate import Generator, build_messages
from ezoforge.models import Loaded, kv_cache_name

JCQA_PROMPT = "質問：{question}\n選択肢：{choices}\n選択肢の中から正しいものを一つ選び、その語句だけを答えてください。"
# Bounds one forward pass's [rows x width x vocab] logits (a 128k vocabulary makes this ~1 GiB in float32).
TOKEN_BUDGET = 2048


def _forward(loaded: Loaded, rows: list[list[int]], starts: list[int]) -> list[float]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), loaded.tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    # Right padding: the real tokens keep positions 0..n-1, so no position ids are needed.
    ids, mask = ids.to(loaded.device), mask.to(loaded.device)
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return [logp[b, s - 1: len(r) - 1].double().sum().item() for b, (r, s) in enumerate(zip(rows, starts))]


def token_logprobs(loaded: Loaded, rows: list[list[int]], starts: list[int]) -> list[float]:
    """Per row, the sum of log P(row[t] | row[:t]) for t >= start (start >= 1); batched by a token budget."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = [0.0] * len(rows)
    batch: list[int] = []
    for i in order + [None]:
        if batch and (i is None or (len(batch) + 1) * len(rows[i]) > TOKEN_BUDGET):
            for j, value in zip(batch, _forward(loaded, [rows[j] for j in batch], [starts[j] for j in batch])):
                out[j] = value
            batch = []
        if i is not None:
            batch.append(i)
    return out


def jcqa_prompt(item: ChoiceItem) -> str:
    return JCQA_PROMPT.format(question=item.question, choices="、".join(item.choices))


def _shared_context_logprobs(loaded: Loaded, context: list[int], continuations: list[list[int]]) -> list[float]:
    """Sum of log P(continuation | context) for each continuation; the context is run once and its KV cache
    shared by all of them (five times less compute than scoring five full rows)."""
    dev, n = loaded.device, len(continuations)
    width = max(map(len, continuations))
    ids = torch.full((n, width), loaded.tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((n, len(context) + width), dtype=torch.long)
    mask[:, : len(context)] = 1
    for b, cont in enumerate(continuations):
        ids[b, : len(cont)] = torch.tensor(cont)
        mask[b, len(context): len(context) + len(cont)] = 1
    cache = DynamicCache()
    with torch.inference_mode():
        first = loaded.model(input_ids=torch.tensor([context], device=dev), use_cache=True, **{kv_cache_name(): cache})
        head = torch.log_softmax(first.logits[0, -1].float(), dim=-1)  # predicts each continuation's first token
        cache.batch_repeat_interleave(n)
        logits = loaded.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), **{kv_cache_name(): cache}).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return [head[cont[0]].item() + sum(logp[b, k - 1, cont[k]].item() for k in range(1, len(cont)))
            for b, cont in enumerate(continuations)]


def choice_logprobs(gen: Generator, system: str | None, items: list[ChoiceItem]) -> list[list[float]]:
    """Per item, the five choices' summed log-probabilities as the assistant's reply."""
    tok = gen.tokenizer
    out = []
    for item in items:
        context = tok(gen.prompt_text(build_messages(jcqa_prompt(item), system)), add_special_tokens=False)["input_ids"]
        out.append(_shared_context_logprobs(gen.loaded, context,
                                            [tok(c, add_special_tokens=False)["input_ids"] for c in item.choices]))
    return out


def pick(logprobs: list[float], choices: tuple[str, ...], normalization: str) -> int:
    scores = logprobs if normalization == "sum" else [lp / max(len(c), 1) for lp, c in zip(logprobs, choices)]
    return max(range(len(scores)), key=scores.__getitem__)  # ties go to the lower index


def passage_nll(loaded: Loaded, texts: list[str], window: int) -> list[tuple[float, int]]:
    """Per text, (total negative log-likelihood, predicted tokens)."""
    rows, owner = [], []
    counts = []
    for n, text in enumerate(texts):
        ids = loaded.tokenizer(text)["input_ids"]
        counts.append(max(len(ids) - 1, 0))
        for k in range(0, len(ids) - 1, window - 1):
            rows.append(ids[k: k + window])
            owner.append(n)
    sums = [0.0] * len(texts)
    for n, lp in zip(owner, token_logprobs(loaded, rows, [1] * len(rows))):
        sums[n] -= lp
    return list(zip(sums, counts))
