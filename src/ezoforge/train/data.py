"""Training data: rows → chat messages → one conversation per source passage (or per pair) → token ids with
assistant-only labels (turns.py) → packed rows."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ezoforge.errors import RecordError
from ezoforge.records import read_rows, require
from ezoforge.stage import input_files
from ezoforge.turns import IGNORE, encode, length, special_ids

# A pair with a source passage: the user turn carries the passage, then the instruction.
USER_WITH_CONTEXT = "{context}\n\n{instruction}"
ROLES = ("system", "user", "assistant")
Conversation = list[dict[str, str]]


def row_messages(path: Path, lineno: int, row: dict[str, Any], system: str | None) -> list[dict[str, str]]:
    """One input row as chat messages: a `messages` list, or instruction + response (+ context)."""
    if row.get("messages") is not None:
        messages = require(path, lineno, row, "messages", list)
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise RecordError(f"{path}:{lineno}: field 'messages[{i}]' must be "
                                  f"{{role: system|user|assistant, content: str}}")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if not any(m["role"] == "assistant" for m in messages):
            raise RecordError(f"{path}:{lineno}: field 'messages' has no assistant turn to learn from")
    else:
        instruction = require(path, lineno, row, "instruction")
        response = require(path, lineno, row, "response")
        context = row.get("context")
        if context is not None and not isinstance(context, str):
            raise RecordError(f"{path}:{lineno}: field 'context' must be str, got {type(context).__name__}")
        # The passage and the instruction ride along: context_loss labels the passage, grouping asks the
        # instruction alone in a later turn of the passage's conversation.
        user = ({"role": "user", "content": USER_WITH_CONTEXT.format(context=context, instruction=instruction),
                 "context": context, "instruction": instruction} if context
                else {"role": "user", "content": instruction})
        messages = [user, {"role": "assistant", "content": response}]
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return messages


def read_conversations(inputs: list[Path], system: str | None) -> list[list[dict[str, str]]]:
    out = [row_messages(path, n, row, system) for path in input_files(inputs) for n, row in read_rows(path)]
    if not out:
        raise RecordError(f"{', '.join(map(str, inputs))}: no training rows")
    if all(not m["content"].strip() for convo in out for m in convo if m["role"] == "assistant"):
        raise RecordError(f"{', '.join(map(str, inputs))}: all {len(out)} responses are empty: nothing to learn")
    return out


def pairs_by_source(inputs: list[Path]) -> dict[str, int]:
    """Input rows per `source` (the field synth writes on each pair), so a run shows its data mix; rows without
    one (a user's own instruction file) are not counted."""
    counts: dict[str, int] = {}
    for path in input_files(inputs):
        for _, row in read_rows(path):
            if row.get("source") is not None:
                counts[str(row["source"])] = counts.get(str(row["source"]), 0) + 1
    return dict(sorted(counts.items()))


@dataclass
class Prepared:
    """Packed training and eval rows, and what the preparation did."""

    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    stats: dict[str, Any] = field(default_factory=dict)


def split_eval(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out slice (at least one example when asked for any and there are two or more)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(items) * fraction)), len(items) - 1) if fraction > 0 and len(items) > 1 else 0
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def pack(examples: list[dict[str, list[int]]], max_length: int, packing: bool) -> list[dict[str, list[int]]]:
    """Rows of at most `max_length` tokens, each with the lengths of the examples in it (positions restart at each).
    Packing is TRL's best-fit-decreasing; without packing every example is its own row."""
    if not packing or not examples:
        return [{**ex, "seq_lengths": [len(ex["input_ids"])]} for ex in examples]
    from datasets import Dataset, disable_progress_bars
    from trl.data_utils import pack_dataset

    disable_progress_bars()  # the train stage shows its own progress
    packed = pack_dataset(Dataset.from_list(examples), max_length, "bfd")
    return packed.to_list()


def by_passage(conversations: list[Conversation]) -> list[list[int]]:
    """The conversations' indices grouped by source passage, each group in input order (synth's order), groups in
    order of first appearance. A passage is its text: synth gives every pair of a passage that text verbatim (a
    document split into several passages gives several groups), and the same text read twice is one passage, so
    no passage lands on both sides of the held-out split. A conversation without a passage is a group of its own."""
    groups: dict[str | int, list[int]] = {}
    for i, convo in enumerate(conversations):
        context = next((m["context"] for m in convo if m.get("context")), None)
        groups.setdefault(context or i, []).append(i)
    return list(groups.values())


def joined(pairs: list[Conversation]) -> Conversation:
    """One passage's pairs as one conversation: the first pair as it trains alone (system prompt, the passage and its
    instruction, the response), then each other pair's instruction alone as a later user turn, and its response."""
    out = list(pairs[0])
    for convo in pairs[1:]:
        user, reply = convo[-2:]
        out += [{"role": "user", "content": user["instruction"]}, reply]
    return out


def pieces(tokenizer, pairs: list[Conversation], max_length: int) -> list[list[Conversation]]:
    """One passage's pairs cut into runs that each fit in `max_length` tokens as one conversation, in order; every run
    starts with the passage again. A pair too long even alone is a run of its own (truncated as a lone pair is)."""
    out, i = [], 0
    while i < len(pairs):
        j = len(pairs)
        if j - i > 1 and length(tokenizer, joined(pairs[i:])) > max_length:  # most groups fit whole: one render
            j = i + 1
            while j < len(pairs) and length(tokenizer, joined(pairs[i:j + 1])) <= max_length:
                j += 1
        out.append(pairs[i:j])
        i = j
    return out


@dataclass
class Encoded:
    examples: list[dict[str, list[int]]] = field(default_factory=list)
    pairs: int = 0  # input rows in `examples`
    ungrouped_tokens: int = 0  # the tokens the same pairs take as one conversation each
    truncated: int = 0
    no_labels: int = 0


def encode_runs(tokenizer, runs: list[list[Conversation]], max_length: int, context_loss: bool,
                count_ungrouped: bool = False) -> Encoded:
    """Each run of pairs as one conversation's ids and labels. Only a lone pair can exceed `max_length` (pieces()
    keeps longer runs within it): it is cut there, as always, and dropped when no response token is left."""
    specials, out = special_ids(tokenizer), Encoded()
    for run in runs:
        ex = encode(tokenizer, joined(run), specials, context_loss)
        if len(ex["input_ids"]) > max_length:
            out.truncated += 1
            ex = {k: v[:max_length] for k, v in ex.items()}
        if all(lab == IGNORE for lab in ex["labels"]):
            out.no_labels += 1  # truncation left no response token
            continue
        out.examples.append(ex)
        out.pairs += len(run)
        if count_ungrouped:
            out.ungrouped_tokens += len(ex["input_ids"]) if len(run) == 1 else sum(
                min(length(tokenizer, convo), max_length) for convo in run)
    return out


def prepare(tokenizer, inputs: list[Path], system: str | None, max_length: int, packing: bool,
            eval_fraction: float, seed: int, context_loss: bool = False, group_pairs: str = "passage") -> Prepared:
    """Training and held-out rows, split by passage (train.eval_fraction of the passages, seeded), one conversation
    per passage (`group_pairs: passage`, split where it would pass max_length) or per pair (`none`)."""
    conversations = read_conversations(inputs, system)
    train_groups, held_groups = split_eval(by_passage(conversations), eval_fraction, seed)

    def runs(groups: list[list[int]]) -> list[list[Conversation]]:
        if group_pairs == "none":  # one conversation per pair, in input order
            return [[conversations[i]] for i in sorted(i for g in groups for i in g)]
        return [run for g in groups for run in pieces(tokenizer, [conversations[i] for i in g], max_length)]

    train = encode_runs(tokenizer, runs(train_groups), max_length, context_loss, count_ungrouped=True)
    held = encode_runs(tokenizer, runs(held_groups), max_length, context_loss)
    if not train.examples:
        raise RecordError(f"{', '.join(map(str, inputs))}: no example keeps a response token within "
                          f"max_length={max_length}")
    rows = pack(train.examples, max_length, packing)
    tokens = sum(len(ex["input_ids"]) for ex in train.examples)
    # examples: training conversations; train_tokens_ungrouped: what the same pairs take with group_pairs none.
    stats = {"examples": len(train.examples), "pairs": train.pairs, "eval_examples": len(held.examples),
             "eval_pairs": held.pairs, "truncated": train.truncated + held.truncated,
             "dropped_no_labels": train.no_labels + held.no_labels, "train_tokens": tokens,
             "train_tokens_ungrouped": train.ungrouped_tokens,
             "trained_tokens": sum(lab != IGNORE for ex in train.examples for lab in ex["labels"]),
             "rows": len(rows), "packing_efficiency": round(tokens / (len(rows) * max_length), 4)}
    if by_source := pairs_by_source(inputs):
        stats["pairs_by_source"] = by_source
    return Prepared(rows, pack(held.examples, max_length, packing), stats)


@dataclass
class PackedCollator:
    """Batches packed rows with position ids that restart at every example and no attention mask, so the model
    keeps packed examples from attending to each other (transformers derives the block-diagonal mask from the
    position ids). `flat` joins the batch into one row with sequence boundaries for varlen flash kernels
    (padding-free); otherwise rows are padded at the end with one-token "sequences" that carry no labels."""

    pad_id: int
    flat: bool = False

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids = [torch.tensor(r["input_ids"]) for r in rows]
        labels = [torch.tensor(r["labels"]) for r in rows]
        pos = [torch.cat([torch.arange(n) for n in r["seq_lengths"]]) for r in rows]
        if self.flat:
            lengths = torch.tensor([n for r in rows for n in r["seq_lengths"]])
            cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
            return {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None],
                    "position_ids": torch.cat(pos)[None], "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                    "max_length_q": int(lengths.max()), "max_length_k": int(lengths.max())}
        width = max(len(x) for x in ids)
        batch = {"input_ids": torch.full((len(rows), width), self.pad_id),
                 "labels": torch.full((len(rows), width), IGNORE),
                 "position_ids": torch.zeros((len(rows), width), dtype=torch.long)}
        for i, (x, lab, p) in enumerate(zip(ids, labels, pos)):
            batch["input_ids"][i, :len(x)], batch["labels"][i, :len(x)], batch["position_ids"][i, :len(x)] = x, lab, p
        return batch
