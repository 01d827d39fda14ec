"""JSON-schema constrained decoding for `response_format` (OpenAI structured outputs), on lm-format-enforcer.

lm-format-enforcer's own transformers glue imports names transformers 5 moved, so the few lines that describe a
tokenizer's vocabulary to it live here; the JSON-schema parser and token enforcement are the library's.
"""
from __future__ import annotations

from typing import Any

import torch

from ezoforge import ja

# The enforcer only lets strings hold characters of its alphabet, printable ASCII by default: add Japanese
# (CJK punctuation, kana, kanji, full-width forms) or every Japanese character would end generation. Also U+FFFD:
# a byte-level token holding the first bytes of a character is seen as "�" until the next token completes it.
JAPANESE = ja.alphabet(ja.SPACE, ja.PUNCT, ja.KANA, ja.KANJI) + "\ufffd"


def parser(schema: dict[str, Any]):
    from lmformatenforcer import CharacterLevelParserConfig, JsonSchemaParser
    from lmformatenforcer.consts import COMPLETE_ALPHABET

    return JsonSchemaParser(schema, CharacterLevelParserConfig(alphabet=COMPLETE_ALPHABET + JAPANESE))


class TokenizerData:
    """What the enforcer needs to know about a tokenizer, built once per model (one decode per vocabulary entry)."""

    def __init__(self, tokenizer, eos_ids: list[int]):
        from lmformatenforcer import TokenEnforcerTokenizerData

        zero = tokenizer.encode("0", add_special_tokens=False)[-1]
        specials = set(tokenizer.all_special_ids)
        regular = []
        for idx in range(len(tokenizer)):
            if idx in specials:
                continue
            # Decoded after "0", a word-start token keeps its leading space that a lone decode would strip.
            after_zero = tokenizer.decode([zero, idx])[1:]
            regular.append((idx, after_zero, len(after_zero) > len(tokenizer.decode([idx]))))
        self.data = TokenEnforcerTokenizerData(regular, lambda ids: tokenizer.decode(ids).rstrip("\ufffd"), eos_ids,
                                               False, len(tokenizer))

    def allowed_tokens_fn(self, schema: dict[str, Any]):
        """A `prefix_allowed_tokens_fn` for `generate` that admits only continuations valid under `schema`."""
        from lmformatenforcer import TokenEnforcer

        root = parser(schema)
        config = root.config
        enforcer = TokenEnforcer(self.data, root)
        # TokenEnforcer swaps in the characters whole vocabulary entries decode to; a byte-level vocabulary holds
        # kana and kanji only as byte pieces, so that alphabet would forbid every Japanese character.
        root.config = config

        def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
            return enforcer.get_allowed_tokens(sent.tolist()).allowed_tokens

        return allowed
