"""The document draw: a seeded, nested mix of curated sources (synth/mix.py), and its errors."""
import json
import logging
from collections import Counter

import pytest

from ezoforge.errors import ConfigError
from ezoforge.records import write_parquet
from ezoforge.stage import Stage
from ezoforge.stages import load_recipe
from ezoforge.synth.mix import draw
from ezoforge.synth.passages import Doc, read_docs
from ezoforge.synth.run import run


def corpus(**sizes):
    """Documents of each named source, grouped by source as curate's shards hold them."""
    return [Doc(f"{source}-{i}", f"{source}の本文{i}です。", source) for source, n in sizes.items() for i in range(n)]


def ids(docs):
    return [d.id for d in docs]


@pytest.mark.parametrize("mix", [None, {"wikipedia": 0.5, "fineweb": 0.5}, {"wikipedia": 0.8, "fineweb": 0.2}])
def test_the_first_n_of_any_limit_are_the_n_of_a_smaller_one(mix):
    docs = corpus(wikipedia=35, fineweb=36)
    full = ids(draw(docs, None, mix, 0, "in"))
    assert sorted(full) == sorted(ids(docs))  # without a limit every document is drawn once
    for n in range(1, len(docs) + 2):
        assert ids(draw(docs, n, mix, 0, "in")) == full[:n], n


def test_shares_follow_document_counts_unless_set():
    docs = corpus(wikipedia=30, fineweb=10)
    assert Counter(d.source for d in draw(docs, 8, None, 0, "in")) == {"wikipedia": 6, "fineweb": 2}
    even = draw(docs, 8, {"wikipedia": 0.5, "fineweb": 0.5}, 0, "in")
    assert Counter(d.source for d in even) == {"wikipedia": 4, "fineweb": 4}
    assert Counter(d.source for d in draw(docs, 8, {"fineweb": 1.0}, 0, "in")) == {"fineweb": 8}  # others left out
    # a random sample of each source, not its first documents, and another seed draws another one
    assert ids(even) != ids(draw(docs, 8, {"wikipedia": 0.5, "fineweb": 0.5}, 1, "in"))
    assert {d.id for d in even if d.source == "wikipedia"} != {f"wikipedia-{i}" for i in range(4)}


def test_a_source_that_runs_out_is_filled_from_the_others(caplog):
    docs = corpus(wikipedia=3, fineweb=20)
    with caplog.at_level(logging.WARNING, logger="ezoforge.synth.mix"):
        drawn = draw(docs, 10, {"wikipedia": 0.8, "fineweb": 0.2}, 0, "in")
    assert Counter(d.source for d in drawn) == {"wikipedia": 3, "fineweb": 7}
    assert [r.getMessage() for r in caplog.records] == [
        "synth: source wikipedia ran out after 3 documents (share 0.8); filling from fineweb"]


def test_a_source_comes_from_its_column_or_the_file_name(tmp_path):
    curated = tmp_path / "curated" / "data"
    write_parquet(curated / "00000.parquet", [{"id": "w1", "text": "本文。", "source": "wikipedia"}])
    plain = tmp_path / "paragraphs.jsonl"
    plain.write_text(json.dumps({"text": "段落です。"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [(d.id, d.source) for d in read_docs([curated / "00000.parquet", plain])] == [
        ("w1", "wikipedia"), ("paragraphs.jsonl:1", "paragraphs")]


def test_a_share_for_an_absent_source_fails_before_the_folder_is_claimed(tmp_path):
    docs = tmp_path / "curated" / "data"
    write_parquet(docs / "00000.parquet", [{"id": "w1", "text": "本文。", "source": "wikipedia"}])
    Stage("curate", tmp_path / "curated", {}).finish({})
    recipe = load_recipe(None, ["synth.mix={wikipedia: 0.5, fineweb: 0.5}"])
    with pytest.raises(ConfigError, match=r"synth\.mix\.fineweb: .* no documents with source 'fineweb' "
                                          r"\(its sources: wikipedia\)"):
        run(recipe, tmp_path / "curated", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mix, message", [
    ("{wikipedia: 0.5, fineweb: 0.4}", r"synth\.mix: .*shares sum to 0\.9, not 1"),
    ("{wikipedia: 0, fineweb: 1}", r"synth\.mix\.wikipedia: .*greater than 0"),
    ("{}", r"synth\.mix: .*at least one source"),
])
def test_shares_are_validated_naming_the_key(mix, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(None, [f"synth.mix={mix}"])
