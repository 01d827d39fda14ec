"""Character-level views of Japanese text that curation, MinHash and the pair filters share: character classes,
how Japanese a text is, and n-gram hashes.

Everything is vectorised over the text's code points (numpy), because per-character Python loops would
cap the whole chain well under 1 MB/s.
"""
from __future__ import annotations

import numpy as np

from ezoforge import ja

OTHER, HIRAGANA, KATAKANA, KANJI, JA_PUNCT, SPACE, MOJIBAKE = range(7)

# (first, last, class) code point ranges, painted in order (a later range wins); anything unpainted is OTHER.
_RANGES = [
    (0x09, 0x0D, SPACE), (0x20, 0x20, SPACE),
    *[(lo, hi, SPACE) for lo, hi in ja.SPACE], *[(lo, hi, JA_PUNCT) for lo, hi in ja.PUNCT],
    *[(lo, hi, HIRAGANA) for lo, hi in ja.HIRAGANA], *[(lo, hi, KATAKANA) for lo, hi in ja.KATAKANA],
    *[(lo, hi, KANJI) for lo, hi in ja.KANJI],
    (0x80, 0x9F, MOJIBAKE),  # C1 controls: bytes decoded as latin-1
    (0xC0, 0xD6, MOJIBAKE), (0xD8, 0xF6, MOJIBAKE), (0xF8, 0xFF, MOJIBAKE),  # Latin-1 letters (not × ÷)
    # cp1252's letters for bytes 0x80-0x9F, as Shift_JIS lead bytes read on Windows come out (‚ƒˆŠ‹ŒŽšœžŸ˜™›)
    (0x152, 0x153, MOJIBAKE), (0x160, 0x161, MOJIBAKE), (0x178, 0x178, MOJIBAKE), (0x17D, 0x17E, MOJIBAKE),
    (0x192, 0x192, MOJIBAKE), (0x2C6, 0x2C6, MOJIBAKE), (0x2DC, 0x2DC, MOJIBAKE), (0x201A, 0x201A, MOJIBAKE),
    (0x2039, 0x203A, MOJIBAKE), (0x2122, 0x2122, MOJIBAKE),
    (0x7E3A, 0x7E3A, MOJIBAKE), (0x7E5D, 0x7E5D, MOJIBAKE), (0x7E67, 0x7E67, MOJIBAKE),  # 縺 繝 繧: UTF-8 kana read as cp932
    (0xFFFD, 0xFFFD, MOJIBAKE),
]


def _table() -> tuple[np.ndarray, np.ndarray]:
    """The painted ranges as run starts and their classes, for a searchsorted lookup."""
    dense = np.full(0x30001, OTHER, dtype=np.int8)
    for first, last, cls in _RANGES:
        dense[first: last + 1] = cls
    starts = np.flatnonzero(np.diff(dense, prepend=np.int8(-1)))
    return starts.astype(np.uint32), dense[starts]


_STARTS, _CLASSES = _table()
_K = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier for the polynomial n-gram hash


def codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


_ASCII_PUNCT = np.zeros(128, dtype=bool)
_ASCII_PUNCT[[ord(c) for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"]] = True


def simplified_codes(text: str) -> np.ndarray:
    """Code points as near-duplicate detection sees them (datatrove's simplify_text, vectorised): lowercase,
    every digit 0, no whitespace and no punctuation (ASCII, Japanese, general)."""
    codes = codepoints(text)
    cls = char_classes(codes)
    punct = (codes < 128) & _ASCII_PUNCT[np.minimum(codes, 127)] | (codes >= 0x2000) & (codes <= 0x206F)
    codes = codes[(cls != SPACE) & (cls != JA_PUNCT) & ~punct]
    codes = np.where((codes >= 0x41) & (codes <= 0x5A), codes + 32, codes)
    return np.where((codes >= 0x30) & (codes <= 0x39), np.uint32(0x30), codes)


def char_classes(codes: np.ndarray) -> np.ndarray:
    return _CLASSES[np.searchsorted(_STARTS, codes, side="right") - 1]


def class_counts(text: str) -> np.ndarray:
    """How many characters of `text` fall in each class (index by the class constants)."""
    return np.bincount(char_classes(codepoints(text)), minlength=MOJIBAKE + 1)


# ---------------------------------------------------------------- how Japanese a text is
# Two measures on purpose: a document is judged on all its characters (Swallow's rule: digits, Latin and symbols
# count against it, so tables and code dumps drop), a short synthesized answer on its letters only ("1945年" or
# "DNAとは何ですか" is Japanese prose, however many digits or acronyms it holds).

def japanese_chars(counts: np.ndarray) -> int:
    """Of `class_counts`: the kana, kanji and Japanese punctuation."""
    return int(counts[HIRAGANA] + counts[KATAKANA] + counts[KANJI] + counts[JA_PUNCT])


def japanese_share(text: str) -> float:
    """A document's Japanese characters (kana, kanji, Japanese punctuation) per character, whitespace aside."""
    counts = class_counts(text)
    chars = counts.sum() - counts[SPACE]
    return float(japanese_chars(counts) / chars) if chars else 0.0


def japanese_ratio(text: str) -> float:
    """A pair's kana and kanji per letter (str.isalpha): digits, punctuation and whitespace do not count, on either
    side, so the share is at most 1 (the kana block's own marks, ・ ゛ 〇, are not letters)."""
    letters = sum(ch.isalpha() for ch in text)
    return sum(ch.isalpha() for ch in ja.LETTER_RE.findall(text)) / letters if letters else 0.0


# ---------------------------------------------------------------- n-grams

def ngram_hashes(codes: np.ndarray, sizes: list[int]) -> dict[int, np.ndarray]:
    """A 64-bit polynomial hash for every character n-gram of each size n (entry i covers codes[i:i+n]),
    built incrementally so all sizes cost max(sizes) vector operations; empty where the text is shorter."""
    out: dict[int, np.ndarray] = {}
    wide = codes.astype(np.uint64)
    h = wide.copy()
    for n in range(1, max(sizes, default=0) + 1):
        if n > 1:
            h = h[:-1] * _K + wide[n - 1:]
        if n in sizes:
            out[n] = h
    return out


def mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads polynomial hashes over all 64 bits before min-hashing."""
    h = h ^ (h >> np.uint64(31))
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(29)
    return h


def repeat_coverage(codes: np.ndarray, sizes: list[int]) -> dict[int, int]:
    """For each n-gram size, the characters covered by the second and later occurrences of repeated n-grams
    (overlaps counted once): Gopher's duplicate n-gram measure, on characters.

    Sizes are handled in increasing order and each only looks at positions whose shorter n-gram was repeated:
    a longer n-gram can only repeat where its prefix does, so on ordinary text the later sizes sort a few
    percent of the positions.
    """
    hashes = ngram_hashes(codes, sizes)
    out: dict[int, int] = {}
    positions: np.ndarray | None = None
    for n in sorted(sizes):
        h = hashes[n]
        positions = np.arange(h.size) if positions is None else positions[positions < h.size]
        values = h[positions]
        order = np.argsort(values, kind="stable")  # stable: within a value, earlier positions first
        ranked = values[order]
        later = np.zeros(values.size, dtype=bool)
        later[1:] = ranked[1:] == ranked[:-1]  # a repeat of the entry before it
        repeats = np.sort(positions[order[later]])
        out[n] = int(np.minimum(np.diff(repeats, append=repeats[-1] + n), n).sum()) if repeats.size else 0
        in_repeated_group = later.copy()
        in_repeated_group[:-1] |= later[1:]
        positions = np.sort(positions[order[in_repeated_group]])
    return out


def top_ngram_count(hashes: np.ndarray) -> int:
    """Occurrences of the most frequent n-gram."""
    if hashes.size == 0:
        return 0
    return int(np.unique(hashes, return_counts=True)[1].max())
