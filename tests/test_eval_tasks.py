import json
import os

import pytest

from ezoforge.errors import ConfigError, EzoError, RecordError
from ezoforge.eval import metrics
from ezoforge.eval.task_types.judged import grade_summary
from ezoforge.models import model_identity
from ezoforge.eval.tasks import load_suite, load_suites, parse_spec

# A config a model can be built from: model.quantize=auto sizes the model from it for the identity.
TINY_CONFIG = json.dumps({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "vocab_size": 64})


def test_specs(tmp_path):
    assert parse_spec("elyza100") == ("elyza100", None)
    assert parse_spec("ppl:/x/y.jsonl")[0] == "ppl"
    for bad, message in [("elyza", "unknown task"), ("ppl", "needs a file"), ("jcqa:", "empty PATH")]:
        with pytest.raises(ConfigError, match=message):
            parse_spec(bad)
    with pytest.raises(RecordError, match="no such file"):
        load_suite(f"jcqa:{tmp_path / 'missing.json'}")


def test_hub_unreachable_says_to_pass_a_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EzoError, match=r"elyza100:PATH"):
        load_suite("elyza100")


def test_bad_row_names_file_line_and_field(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"input": "a", "output": "b", "eval_aspect": ""}, ensure_ascii=False) + "\n"
                    + json.dumps({"input": "c", "eval_aspect": ""}) + "\n", encoding="utf-8")
    with pytest.raises(RecordError, match=rf"{path}:2: missing field 'output'"):
        load_suite(f"elyza100:{path}")
    assert len(load_suite(f"elyza100:{path}", limit=1).items) == 1  # the bad line is past the limit


def test_jcqa_label_is_checked(tmp_path):
    path = tmp_path / "q.json"
    row = {"q_id": 7, "question": "q", **{f"choice{i}": f"c{i}" for i in range(5)}, "label": 5}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(RecordError, match=":1: field 'label' must be 0..4"):
        load_suite(f"jcqa:{path}")


def test_shared_benchmarks_load(shared_data):
    elyza = load_suite(f"elyza100:{shared_data / 'elyza-tasks-100/test.jsonl'}")
    assert len(elyza.items) == 100 and elyza.items[0].id == "elyza100/1" and elyza.items[0].aspect
    mt = load_suite(f"mt-bench-ja:{shared_data / 'ja-mt-bench/question_full.jsonl'}", limit=5)
    assert mt.items[0].id.startswith("mt-bench-ja/") and mt.items[0].reference is None
    jcqa = load_suite(f"jcqa:{shared_data / 'jglue/jcommonsenseqa/valid-v1.3.json'}", limit=3)
    assert all(len(it.choices) == 5 and 0 <= it.label < 5 for it in jcqa.items)
    with pytest.raises(ConfigError, match="more than once"):
        load_suites([f"jcqa:{shared_data / 'jglue/jcommonsenseqa/valid-v1.3.json'}"] * 2, limit=1)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    grades = [1, 2, 2, 3, 4, 5, 5, 3]
    ci = metrics.bootstrap_ci(grades, 1000, 0)
    assert ci == metrics.bootstrap_ci(grades, 1000, 0) and ci != metrics.bootstrap_ci(grades, 1000, 1)
    assert ci[0] < sum(grades) / len(grades) < ci[1]
    same = metrics.paired_bootstrap(grades, grades, 1000, 0)
    assert (same["diff"], same["ci95"], same["p_not_better"]) == (0.0, [0.0, 0.0], 1.0)


def test_chrf_is_character_level():
    corpus, per = metrics.chrf(["東京は日本の首都です。", "まったく別の文"], ["日本の首都は東京です。", "まったく別の文"])
    assert per[1] == 100.0 and 0 < per[0] < 100 and 0 < corpus < 100
    assert "nc:6|nw:0" in metrics.chrf_signature()


def test_model_identity_follows_content(tmp_path, monkeypatch):
    monkeypatch.setenv("EZO_CACHE_DIR", str(tmp_path / "cache"))
    model, adapter = tmp_path / "model", tmp_path / "adapter"
    model.mkdir()
    adapter.mkdir()
    (model / "config.json").write_text(TINY_CONFIG)
    (model / "model.safetensors").write_bytes(b"w" * 10)
    (adapter / "adapter_model.safetensors").write_bytes(b"a" * 10)
    first = model_identity(str(model), adapter)
    assert first == model_identity(str(model), adapter) != model_identity(str(model), None)
    (adapter / "adapter_model.safetensors").write_bytes(b"b" * 10)  # same size, new content
    second = model_identity(str(model), adapter)
    assert second != first
    os.utime(model / "model.safetensors", ns=(1, 1))  # touched, same bytes: the same model
    assert model_identity(str(model), adapter) == second
    (model / "model.safetensors").write_bytes(b"v" * 10)  # new weights of the same size
    assert model_identity(str(model), adapter) != second
    assert model_identity(str(model), adapter, dtype="bfloat16") != model_identity(str(model), adapter)


def test_model_identity_of_a_stage_folder_is_its_done_fingerprint(tmp_path, monkeypatch):
    from ezoforge.stage import Stage

    monkeypatch.setenv("EZO_CACHE_DIR", str(tmp_path / "cache"))
    merged = tmp_path / "merged"
    stage = Stage("merge", merged, {"train_fingerprint": "abc"}, atomic=True)
    stage.start()
    (stage.folder / "config.json").write_text(TINY_CONFIG)
    stage.finish({})
    first = model_identity(str(merged))
    other = Stage("merge", merged, {"train_fingerprint": "xyz"}, atomic=True)
    other.start(force=True)
    (other.folder / "config.json").write_text(TINY_CONFIG)
    other.finish({})
    assert model_identity(str(merged)) != first  # same files, another training run


def _j(grade, task=1):
    return {"task_id": f"elyza100/{task}", "grade": grade, "error": None if grade else "judge request failed"}


@pytest.mark.parametrize("grades,allow_partial,status,mean", [
    ([4, 2, 3], False, "complete", 3.0),
    ([4, None, 2], False, "failed", None),  # no mean over partial results
    ([4, None, 2], True, "partial", 3.0),
    ([None, None], True, "failed", None),  # nothing graded: never a score, even when partial is allowed
])
def test_grade_summary(grades, allow_partial, status, mean):
    summary = grade_summary([_j(g, n) for n, g in enumerate(grades)], len(grades), True, allow_partial, 1000, 0)
    assert (summary["status"], summary["mean_grade"]) == (status, mean)
    assert summary["n_scored"] + summary["n_failed"] == len(grades)
    assert (summary["ci95"] is None) == (mean is None)


def test_grade_summary_without_judge():
    assert grade_summary([], 3, False, False, 1000, 0)["status"] == "not_judged"
    assert grade_summary([], 0, False, False, 1000, 0)["status"] == "complete"  # e.g. a jcqa-only run
