"""The `curate:` section of a recipe: the inputs, the Japanese quality filters' thresholds (a `Rule` each, in
run order), normalization, deduplication and the executor the passes run on."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ezoforge.config import ExecutorConfig, Operational, Section, bundled_data


# Curation thresholds. Sources: Swallow corpus v1 (Okazaki et al. 2024, "Building a Large Japanese Web Corpus
# for Large Language Models", quality filtering), FineWeb-2 `jpn_Jpan` (Penedo et al. 2025), llm-jp-corpus v1
# cleaning; "ours" where no published value fits character-level Japanese (see ezoforge/curate/ja_filters.py).

class Rule(Section):
    enabled: bool = True


class MojibakeRule(Rule):
    # ours: share of mojibake markers (U+FFFD, C1, Latin-1 letters, 縺繧繝). Mis-decoded pages score 0.3+;
    # a clean FineWeb-2 page on Bézier with French names scores 0.02.
    max_ratio: float = Field(0.05, ge=0, le=1)


class JapaneseRule(Rule):
    min_ratio: float = Field(0.5, ge=0, le=1)  # Swallow: Japanese characters ≥ 0.5


class LengthRule(Rule):
    min_chars: int = Field(400, ge=0)  # Swallow: ≥ 400 characters
    min_ja_chars: int = Field(400, ge=0)  # Swallow: ≥ 400 Japanese characters


class KanaRule(Rule):
    min_hiragana: float = Field(0.2, ge=0, le=1)  # Swallow
    max_katakana: float = Field(0.5, ge=0, le=1)  # Swallow


class SentenceRule(Rule):
    min_avg: float = Field(20, ge=0)  # Swallow: average sentence length 20–90
    max_avg: float = Field(90, ge=0)
    # Swallow: longest sentence ≤ 200, but 10 of JSQuAD's 91 Wikipedia articles (≥ 400 chars) have a genuine
    # 202–383-character sentence; 400 keeps clean encyclopedic text and still drops unpunctuated walls.
    max_len: int = Field(400, ge=1)


class EllipsisRule(Rule):
    max_ratio: float = Field(0.2, ge=0, le=1)  # Swallow: lines ending in an ellipsis ≤ 0.2


class DuplicatesRule(Rule):
    # Swallow (after Gopher): duplicate lines/paragraphs ≤ 0.30 by count, ≤ 0.20 by characters.
    # FineWeb-2 jpn_Jpan's duplicate-line fraction is 0.375, looser than Swallow's, so Swallow's applies.
    max_lines: float = Field(0.30, ge=0, le=1)
    max_line_chars: float = Field(0.20, ge=0, le=1)
    max_paragraphs: float = Field(0.30, ge=0, le=1)
    max_paragraph_chars: float = Field(0.20, ge=0, le=1)


# Swallow's n-gram rules come from Gopher, whose n counts words; without a tokenizer we count characters and
# take a Japanese word as 2 characters (UniDic short units average about that), so word n-gram -> 2n characters.
# At n characters (5..10) the rule dropped 57% of JSQuAD's Wikipedia articles; at 2n it keeps them.

class TopNgramRule(Rule):
    max_ratio: dict[int, float] = {4: 0.20, 6: 0.18, 8: 0.16}  # Swallow: top 2/3/4-gram share, as 2n characters


class DupNgramRule(Rule):
    # Swallow: characters in duplicated 5..10-grams ≤ 0.15 … 0.10, as 2n characters
    max_ratio: dict[int, float] = {10: 0.15, 12: 0.14, 14: 0.13, 16: 0.12, 18: 0.11, 20: 0.10}


class LinesRule(Rule):
    min_punct_lines: float = Field(0.12, ge=0, le=1)  # FineWeb line_punct_thr (FineWeb-2 keeps the rule)
    max_newline_ratio: float = Field(0.1, ge=0)  # ours: newlines per character (FineWeb: 0.3 per word)


class StopwordRule(Rule):
    words: list[str] = list("のにをはたてがとで年し・月れさ")  # FineWeb-2 jpn_Jpan stopwords
    min_count: int = Field(2, ge=0)  # Gopher / FineWeb-2: at least 2 stopwords


class NgWordRule(Rule):
    # Swallow drops pages by an NG-expression ratio; this short list and ratio are ours.
    words: list[str] = ["アダルト", "無修正", "出会い系", "セフレ", "エロ動画", "オンラインカジノ", "高収入",
                        "即金", "稼げる", "今すぐ登録", "激安", "最安値", "送料無料", "完全無料"]
    max_ratio: float = Field(0.03, ge=0, le=1)


class FiltersConfig(Section):
    """The Japanese quality filters, in the order they run (the first that fails names the reason)."""

    mojibake: MojibakeRule = MojibakeRule()
    japanese: JapaneseRule = JapaneseRule()
    kana: KanaRule = KanaRule()
    length: LengthRule = LengthRule()
    sentences: SentenceRule = SentenceRule()
    ellipsis: EllipsisRule = EllipsisRule()
    duplicates: DuplicatesRule = DuplicatesRule()
    top_ngram: TopNgramRule = TopNgramRule()
    dup_ngram: DupNgramRule = DupNgramRule()
    lines: LinesRule = LinesRule()
    stopwords: StopwordRule = StopwordRule()
    ng_words: NgWordRule = NgWordRule()


class NormalizeConfig(Section):
    nfkc: bool = True
    keep: str = "…‥！？～"  # NFKC would fold these to ASCII ("...", "!", "~"), changing Japanese typography
    strip_urls: bool = True  # llm-jp-corpus
    max_ascii_run: int | None = Field(100, ge=1)  # llm-jp-corpus strips long ASCII runs; the length is ours
    drop_lines_without_kana: bool = True  # llm-jp-corpus


class DedupConfig(Section):
    enabled: bool = True
    n_grams: int = Field(5, ge=1)  # Swallow: character 5-grams
    # Swallow: 20 bands x 20 rows; P(a Jaccard-0.9 pair shares a band) = 1 - (1 - 0.9**20)**20 = 0.925
    num_buckets: int = Field(20, ge=1)
    hashes_per_bucket: int = Field(20, ge=1)
    seed: int = 1


class CurateConfig(Section):
    # `inputs` are fingerprinted by content (stage.input_fingerprints), not by how they were named.
    inputs: Operational[list[str]] = []
    workers: Operational[int] = Field(1, ge=1)
    on_error: Literal["fail", "skip"] = "fail"
    split_mb: float = Field(64, gt=0)  # inputs bigger than this are read as several strided shards (tasks)
    limit: int | None = Field(None, ge=1)  # documents read from each input, its first N (a smoke run, a sample)
    normalize: NormalizeConfig = NormalizeConfig()
    filters: FiltersConfig = FiltersConfig()
    dedup: DedupConfig = DedupConfig()
    executor: Operational[ExecutorConfig] = ExecutorConfig()

    @field_validator("inputs")
    @classmethod
    def _bundled_inputs(cls, inputs: list[str]) -> list[str]:
        return [bundled_data(p) for p in inputs]
