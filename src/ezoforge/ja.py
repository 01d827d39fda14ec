"""Japanese character classes and sentence ends: the one definition curation, synthesis and constrained decoding use.

Each class is a list of inclusive code point ranges.
"""
from __future__ import annotations

import re

HIRAGANA = [(0x3041, 0x309F)]
KATAKANA = [(0x30A0, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F)]  # incl. phonetic extensions and half-width
KANJI = [(0x3005, 0x3007),  # 々 〆 〇
         (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FFFF)]
PUNCT = [(0x3001, 0x3004), (0x3008, 0x303F), (0xFF01, 0xFF65)]  # 、。 brackets, full- and half-width forms
SPACE = [(0x3000, 0x3000)]  # ideographic space

KANA = HIRAGANA + KATAKANA
LETTERS = KANA + KANJI  # what counts as Japanese writing

# What ends a sentence: 。！？ and the ASCII forms NFKC gives ！？; closing brackets after one still belong to it.
SENTENCE_ENDS = "。！？!?"
CLOSING_BRACKETS = "」』）)】"


def char_class(ranges: list[tuple[int, int]]) -> str:
    """A regex character class for the ranges, e.g. `[\\u3041-\\u309f…]`."""
    return "[" + "".join(f"{re.escape(chr(lo))}-{re.escape(chr(hi))}" for lo, hi in ranges) + "]"


def alphabet(*classes: list[tuple[int, int]]) -> str:
    """Every character of the classes' Basic Multilingual Plane ranges, as one string."""
    return "".join(chr(c) for ranges in classes for lo, hi in ranges if hi <= 0xFFFF for c in range(lo, hi + 1))


KANA_RE = re.compile(char_class(KANA))
LETTER_RE = re.compile(char_class(LETTERS))
