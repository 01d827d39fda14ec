"""Lineage follows what each DONE recorded, with no stage names: a stage inserted into the chain is passed through,
and the card's provenance still reaches curate."""
from pathlib import Path

from ezoforge.export.card import _data_section
from ezoforge.export.provenance import gather
from ezoforge.stage import Stage, lineage


def finished(name: str, out: Path, inputs: list[Path], stats: dict, adapter: bool = False) -> Path:
    stage = Stage(name, out, {name: {"k": 1}}, model={"name": "base-model"}, inputs=inputs)
    stage.start()
    if adapter:
        (out / "adapter").mkdir()
        (out / "adapter" / "adapter_config.json").write_text("{}")
    stage.finish(stats)
    return out


def test_a_stage_inserted_between_train_and_merge_keeps_the_provenance(tmp_path):
    corpus = tmp_path / "wiki.xml"
    corpus.write_text("<mediawiki/>")
    curate = finished("curate", tmp_path / "curate", [corpus], {"docs_in": 9, "docs_out": 7, "inputs": [str(corpus)]})
    synth = finished("synth", tmp_path / "synth", [curate], {"pairs": 12, "documents": 7})
    train = finished("train", tmp_path / "train", [synth], {"steps": 3}, adapter=True)
    # A stage this ezoforge does not know, between the SFT and the merge.
    polish = finished("polish", tmp_path / "polish", [train], {"steps": 2}, adapter=True)
    merged = finished("merge", tmp_path / "merged", [polish], {})

    chain = lineage(merged)
    assert [(p.name, d.stage) for p, d in chain] == [("merged", "merge"), ("polish", "polish"), ("train", "train"),
                                                     ("synth", "synth"), ("curate", "curate")]
    rec = gather(merged, {})
    assert rec.train["dir"] == train and [s["dir"] for s in rec.synth] == [synth]
    assert [c["dir"] for c in rec.curate] == [curate]
    assert "Curated documents: 7 kept of 9 read from wiki.xml." in _data_section(rec)
    assert rec.folders() == [merged, polish, train, synth, curate]  # the export's fingerprint covers them all


def test_lineage_visits_a_folder_read_twice_once(tmp_path):
    curate = finished("curate", tmp_path / "curate", [], {})
    a = finished("synth", tmp_path / "a", [curate], {})
    b = finished("synth", tmp_path / "b", [curate], {})
    train = finished("train", tmp_path / "train", [a, b], {})
    assert [p.name for p, _ in lineage(train)] == ["train", "a", "b", "curate"]
    assert lineage(tmp_path / "nowhere") == []


def test_the_data_behind_a_model_is_its_training_text_not_an_eval_s_tasks(tmp_path):
    from ezoforge.eval.contamination import training_sources

    docs, pairs, tasks = (tmp_path / n for n in ("docs.jsonl", "pairs.jsonl", "tasks.jsonl"))
    for f in (docs, pairs, tasks):
        f.write_text("{}\n")
    synth = finished("synth", tmp_path / "synth", [docs], {})
    train = finished("train", tmp_path / "train", [synth, pairs], {}, adapter=True)
    merged = finished("merge", tmp_path / "merged", [train], {})
    evaluated = finished("eval", tmp_path / "eval-tuned", [tasks, merged], {})
    export = finished("export", tmp_path / "export", [merged, evaluated], {})
    sources, missing = training_sources(str(export), None)
    assert {(s.kind, s.stage, s.path.name) for s in sources} == {
        ("pairs", "synth", "synth"), ("documents", "file", "docs.jsonl"), ("pairs", "file", "pairs.jsonl")}
    assert missing == []
