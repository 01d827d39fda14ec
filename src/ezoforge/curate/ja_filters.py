"""Small Japanese text cleaners and quality filters, each a datatrove block.

Filters keep a document or drop it with a reason (the name stats and rejected/ use) and a detail
("hiragana_ratio=0.05 < 0.2"); their measurements go into the document's metadata and end up as the kept
document's filter scores. Thresholds live in the recipe (`curate.filters.*`, see curate/settings.py for the
defaults and their sources). Datatrove's own Gopher/FineWeb quality filters count words, which needs a
Japanese tokenizer and drops all Japanese at their defaults, so these work on characters instead.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Any, ClassVar

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters.base import BaseFormatter

from ezoforge import ja
from ezoforge import text as tx
from ezoforge.curate.settings import (DuplicatesRule, DupNgramRule, EllipsisRule, FiltersConfig, JapaneseRule, KanaRule,
                                      LengthRule, LinesRule, MojibakeRule, NgWordRule, NormalizeConfig, Rule,
                                      SentenceRule, StopwordRule, TopNgramRule)

_URL = re.compile(r"(?:https?|ftp)://[!-~]+|www\.[!-~]+")
_CONTROL = re.compile(r"[\x00-\x08\x0B-\x1F\x7F]")
# A line break ends a sentence here too, and "." not before a digit: NFKC turns the academic "．" into it.
_SENTENCE_END = re.compile(rf"(?:[{re.escape(ja.SENTENCE_ENDS)}\n]|\.(?!\d))+")
_TERMINAL = ("。", "！", "？", "!", "?", "」", "』", "）", ")", "…", "‥", ".", '"', "'")
_ELLIPSES = ("…", "‥", "...", "・・・")


def _ratio(part: float, whole: float) -> float:
    return float(part / whole) if whole else 0.0


# ---------------------------------------------------------------- cleaners (text in, text out)

def normalize(text: str, keep: str = "…‥！？～", nfkc: bool = True) -> str:
    """NFKC (full-width ASCII to ASCII, half-width kana to full-width) except the characters in `keep`;
    unify newlines, drop control characters, trailing spaces and runs of blank lines."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if nfkc and not unicodedata.is_normalized("NFKC", text):
        if keep:
            parts = re.split(f"([{re.escape(keep)}])", text)
            text = "".join(p if i % 2 else unicodedata.normalize("NFKC", p) for i, p in enumerate(parts))
        else:
            text = unicodedata.normalize("NFKC", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def clean_lines(text: str, cfg: NormalizeConfig) -> str:
    """llm-jp-corpus style line cleaning: strip URLs and long ASCII runs, drop lines without any kana."""
    if cfg.strip_urls:
        text = _URL.sub("", text)
    if cfg.max_ascii_run:
        text = re.sub(f"[ -~]{{{cfg.max_ascii_run},}}", "", text)
    if cfg.drop_lines_without_kana:
        # blank lines survive so paragraph breaks do (runs of them are squeezed below)
        text = "\n".join(line for line in text.split("\n") if not line.strip() or ja.KANA_RE.search(line))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


class Normalize(BaseFormatter):
    name = "🈂 NFKC (Japanese punctuation kept)"

    def __init__(self, cfg: NormalizeConfig):
        super().__init__()
        self.cfg = cfg

    def format(self, text: str) -> str:
        return normalize(text, self.cfg.keep, self.cfg.nfkc)


class CleanLines(BaseFormatter):
    name = "🧹 llm-jp line cleaning"

    def __init__(self, cfg: NormalizeConfig):
        super().__init__()
        self.cfg = cfg

    def format(self, text: str) -> str:
        return clean_lines(text, self.cfg)


# ---------------------------------------------------------------- filters

class JaFilter(BaseFilter):
    """measure(text) -> scores; fail(scores) -> (reason, detail) or None. `rule_type` is the recipe rule it reads
    (its field in config.FiltersConfig sets the run order); `before_cleaning` filters judge the text as found, the
    rest the text after line cleaning."""

    rule_type: ClassVar[type[Rule]]
    before_cleaning: ClassVar[bool] = False

    def __init__(self, rule: Rule, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.rule = rule

    def measure(self, text: str) -> dict[str, float]:
        raise NotImplementedError

    def fail(self, m: dict[str, float]) -> tuple[str, str] | None:
        raise NotImplementedError

    def verdict(self, text: str) -> tuple[str, str] | None:
        return self.fail(self.measure(text))

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        m = self.measure(doc.text)
        doc.metadata.update(m)
        failed = self.fail(m)
        if failed is None:
            return True
        doc.metadata["filter_detail"] = failed[1]
        return False, failed[0]


def _below(reason: str, key: str, m: dict[str, float], limit: float) -> tuple[str, str] | None:
    return (reason, f"{key}={m[key]:.3g} < {limit:g}") if m[key] < limit else None


def _above(reason: str, key: str, m: dict[str, float], limit: float) -> tuple[str, str] | None:
    return (reason, f"{key}={m[key]:.3g} > {limit:g}") if m[key] > limit else None


class MojibakeFilter(JaFilter):
    """Mis-decoded text: U+FFFD, C1 controls and Latin-1 letters (UTF-8 or Shift_JIS read as latin-1/cp1252),
    and 縺/繧/繝 (UTF-8 kana read as cp932). Threshold ours: 0.05 (see curate/settings.py)."""

    name = "🔣 mojibake"
    rule_type = MojibakeRule
    before_cleaning = True

    def measure(self, text):
        c = tx.class_counts(text)
        return {"mojibake_ratio": _ratio(c[tx.MOJIBAKE], c.sum() - c[tx.SPACE])}

    def fail(self, m):
        return _above("mojibake", "mojibake_ratio", m, self.rule.max_ratio)


class JapaneseFilter(JaFilter):
    """Share of Japanese characters (hiragana, katakana, kanji, Japanese punctuation) ≥ 0.5 (Swallow).
    Drops English pages, HTML/code dumps and numeric tables."""

    name = "🗾 Japanese characters"
    rule_type = JapaneseRule
    before_cleaning = True

    def measure(self, text):
        return {"ja_ratio": tx.japanese_share(text)}

    def fail(self, m):
        return _below("not_japanese", "ja_ratio", m, self.rule.min_ratio)


class LengthFilter(JaFilter):
    """≥ 400 characters and ≥ 400 Japanese characters (Swallow); whitespace does not count."""

    name = "📏 length"
    rule_type = LengthRule

    def measure(self, text):
        c = tx.class_counts(text)
        return {"chars": float(c.sum() - c[tx.SPACE]), "ja_chars": float(tx.japanese_chars(c))}

    def fail(self, m):
        return _below("too_short", "chars", m, self.rule.min_chars) or \
            _below("too_short", "ja_chars", m, self.rule.min_ja_chars)


class KanaFilter(JaFilter):
    """Hiragana ≥ 0.2 (drops Chinese, keyword lists) and katakana ≤ 0.5 (drops product-name spam) (Swallow)."""

    name = "🈁 kana ratios"
    rule_type = KanaRule
    before_cleaning = True

    def measure(self, text):
        c = tx.class_counts(text)
        chars = c.sum() - c[tx.SPACE]
        return {"hiragana_ratio": _ratio(c[tx.HIRAGANA], chars), "katakana_ratio": _ratio(c[tx.KATAKANA], chars)}

    def fail(self, m):
        return _below("hiragana_ratio", "hiragana_ratio", m, self.rule.min_hiragana) or \
            _above("katakana_ratio", "katakana_ratio", m, self.rule.max_katakana)


class SentenceFilter(JaFilter):
    """Average sentence length 20–90 (Swallow) and longest sentence ≤ 400 characters (Swallow's 200 drops
    clean Wikipedia, see curate/settings.py). Sentences end at 。！？!?, a "." not followed by a digit, or a line
    break."""

    name = "✂ sentence length"
    rule_type = SentenceRule

    def measure(self, text):
        lengths = [len(s) for s in (s.strip() for s in _SENTENCE_END.split(text)) if s]
        if not lengths:
            return {"avg_sentence": 0.0, "max_sentence": 0.0}
        return {"avg_sentence": sum(lengths) / len(lengths), "max_sentence": float(max(lengths))}

    def fail(self, m):
        r = self.rule
        return _below("sentence_length", "avg_sentence", m, r.min_avg) or \
            _above("sentence_length", "avg_sentence", m, r.max_avg) or \
            _above("long_sentence", "max_sentence", m, r.max_len)


def _lines(text: str) -> list[str]:
    return [line for line in (line.strip() for line in text.split("\n")) if line]


class EllipsisFilter(JaFilter):
    """Lines ending in an ellipsis (… ‥ ... ・・・) ≤ 0.2 (Swallow, after Gopher): truncated teasers."""

    name = "… ellipsis"
    rule_type = EllipsisRule

    def measure(self, text):
        lines = _lines(text)
        return {"ellipsis_ratio": _ratio(sum(line.endswith(_ELLIPSES) for line in lines), len(lines))}

    def fail(self, m):
        return _above("ellipsis", "ellipsis_ratio", m, self.rule.max_ratio)


def _repeats(units: list[str]) -> tuple[int, int]:
    """(repeated units, their characters): every occurrence after the first counts (Gopher)."""
    seen: set[str] = set()
    count = chars = 0
    for u in units:
        if u in seen:
            count += 1
            chars += len(u)
        else:
            seen.add(u)
    return count, chars


class DuplicatesFilter(JaFilter):
    """Duplicate lines and paragraphs ≤ 0.30 of their count and ≤ 0.20 of the characters (Swallow)."""

    name = "♻ duplicate lines"
    rule_type = DuplicatesRule

    def measure(self, text):
        lines = _lines(text)
        paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        n_lines, line_chars = _repeats(lines)
        n_paras, para_chars = _repeats(paras)
        return {"dup_line_ratio": _ratio(n_lines, len(lines)), "dup_line_char_ratio": _ratio(line_chars, len(text)),
                "dup_para_ratio": _ratio(n_paras, len(paras)), "dup_para_char_ratio": _ratio(para_chars, len(text))}

    def fail(self, m):
        r = self.rule
        return _above("dup_lines", "dup_line_ratio", m, r.max_lines) or \
            _above("dup_lines", "dup_line_char_ratio", m, r.max_line_chars) or \
            _above("dup_paragraphs", "dup_para_ratio", m, r.max_paragraphs) or \
            _above("dup_paragraphs", "dup_para_char_ratio", m, r.max_paragraph_chars)


def _dense(text: str) -> np.ndarray:
    """Code points without whitespace, so n-grams run across line breaks as the reader sees them."""
    return tx.codepoints(re.sub(r"\s+", "", text))


class TopNgramFilter(JaFilter):
    """Characters in the most frequent n-gram ≤ 0.20/0.18/0.16 for Swallow's word 2/3/4-grams, taken as
    4/6/8 characters (see curate/settings.py): keyword stuffing."""

    name = "🔝 top n-gram"
    rule_type = TopNgramRule

    def measure(self, text):
        codes = _dense(text)
        hashes = tx.ngram_hashes(codes, list(self.rule.max_ratio))
        return {f"top_{n}gram": min(1.0, _ratio(tx.top_ngram_count(h) * n, len(codes))) for n, h in sorted(hashes.items())}

    def fail(self, m):
        for n, limit in sorted(self.rule.max_ratio.items()):
            if failed := _above("top_ngram", f"top_{n}gram", m, limit):
                return failed
        return None


class DupNgramFilter(JaFilter):
    """Characters in repeated n-grams ≤ 0.15 … 0.10 for Swallow's word 5..10-grams, taken as 10..20
    characters (see curate/settings.py): repeated sentences and boilerplate."""

    name = "🔁 duplicate n-grams"
    rule_type = DupNgramRule

    def measure(self, text):
        codes = _dense(text)
        covered = tx.repeat_coverage(codes, list(self.rule.max_ratio))
        return {f"dup_{n}gram": _ratio(c, len(codes)) for n, c in sorted(covered.items())}

    def fail(self, m):
        for n, limit in sorted(self.rule.max_ratio.items()):
            if failed := _above("dup_ngram", f"dup_{n}gram", m, limit):
                return failed
        return None


class LinesFilter(JaFilter):
    """FineWeb-2's line rules: lines ending in punctuation ≥ 0.12 (menus and link lists end in none) and
    newlines per character ≤ 0.1 (FineWeb's 0.3 per word, with Japanese words of about 3 characters)."""

    name = "📃 line structure"
    rule_type = LinesRule

    def measure(self, text):
        lines = _lines(text)
        chars = len(text) - len(re.findall(r"\s", text))
        return {"punct_line_ratio": _ratio(sum(line.endswith(_TERMINAL) for line in lines), len(lines)),
                "newline_ratio": _ratio(text.count("\n"), chars)}

    def fail(self, m):
        return _below("line_punct", "punct_line_ratio", m, self.rule.min_punct_lines) or \
            _above("newline_ratio", "newline_ratio", m, self.rule.max_newline_ratio)


class StopwordFilter(JaFilter):
    """At least 2 FineWeb-2 jpn_Jpan stopwords (の に を は …). Counted as substrings, since there are no
    word boundaries without a tokenizer: this only catches text with almost no Japanese grammar."""

    name = "🛑 stopwords"
    rule_type = StopwordRule

    def measure(self, text):
        return {"stopwords": float(sum(text.count(w) for w in self.rule.words))}

    def fail(self, m):
        return _below("stopwords", "stopwords", m, self.rule.min_count)


class NgWordFilter(JaFilter):
    """Share of characters inside NG expressions ≤ 0.03 (Swallow drops by an NG-expression ratio; list and
    ratio ours: adult, gambling and get-rich-quick spam)."""

    name = "🚫 NG words"
    rule_type = NgWordRule

    def __init__(self, rule: Rule, exclusion_writer=None):
        super().__init__(rule, exclusion_writer)
        words = sorted(rule.words, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, words))) if words else None

    def measure(self, text):
        hits = sum(map(len, self._pattern.findall(text))) if self._pattern else 0
        return {"ng_ratio": _ratio(hits, len(text))}

    def fail(self, m):
        return _above("ng_words", "ng_ratio", m, self.rule.max_ratio)


_BY_RULE = {f.rule_type: f for f in JaFilter.__subclasses__()}
# Each recipe filter's block, in the order FiltersConfig declares them (the run order, declared there only).
FILTERS: dict[str, type[JaFilter]] = {name: _BY_RULE[field.annotation]
                                      for name, field in FiltersConfig.model_fields.items()}


def build_chain(filters: FiltersConfig, normalize_cfg: NormalizeConfig, exclusion_writer=None) -> list[Any]:
    """Normalize → filters on the text as found → line cleaning → the remaining filters. Dropped documents
    go to `exclusion_writer` (a datatrove writer, shared by all filters) when one is given."""
    rules = [(block, getattr(filters, name)) for name, block in FILTERS.items()]
    made = [(block, block(rule, exclusion_writer)) for block, rule in rules if rule.enabled]
    return [Normalize(normalize_cfg), *(f for block, f in made if block.before_cleaning), CleanLines(normalize_cfg),
            *(f for block, f in made if not block.before_cleaning)]
