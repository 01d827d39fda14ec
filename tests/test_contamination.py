"""The contamination check: tasks planted in the training data (pairs or curated documents) are found by following
the DONE records from the evaluated model back to them; clean data passes; `fail` stops before anything is judged."""
import json
from pathlib import Path

import pytest
from markupsafe import escape

from ezoforge.config import bundled_data
from ezoforge.errors import EzoError
from ezoforge.eval import contamination
from ezoforge.eval.tasks import load_suite
from ezoforge.records import write_jsonl, write_parquet
from ezoforge.stage import Stage
from ezoforge.stages import load_recipe

REPO = Path(__file__).resolve().parents[1]
TASKS = bundled_data("bundled:tasks/demo-tasks.jsonl")

DOCS = [  # written for this test: about topics none of the demo tasks asks about
    "鎌倉は神奈川県の南東部にある市で、十二世紀の終わりに武家政権が置かれた土地として知られる。寺社が多く、"
    "春と秋には多くの観光客が訪れる。海に面しており、夏は海水浴場もにぎわう。",
    "味噌は大豆に麹と塩を加えて発酵させた調味料である。地域によって米麹、麦麹、豆麹が使い分けられ、色や味わいも"
    "大きく異なる。味噌汁のほか、和え物や漬け床にも使われる。",
]
PAIRS = [
    {"instruction": "鎌倉が歴史の上で知られている理由を一文で答えてください。",
     "response": "十二世紀の終わりに武家政権が置かれた土地だからです。"},
    {"instruction": "味噌の原料と作り方を簡単に説明してください。",
     "response": "大豆に麹と塩を加え、発酵させて作ります。麹の種類は地域によって異なります。"},
]


def tasks():
    return load_suite(f"elyza100:{TASKS}").items


def stage_folder(out: Path, name: str, rows: list[dict], inputs: list[Path] = (), **settings) -> Path:
    """A finished stage folder written through the real stage life cycle: data/ shard, stats, DONE last."""
    stage = Stage(name, out, {"test": name, **settings}, inputs=list(inputs))
    stage.start()
    if rows:
        write_parquet(out / "data" / "part-00000.parquet", rows)
    stage.finish({"rows": len(rows)})
    return out


def workdir(root: Path, pairs: list[dict], docs: list[str] = DOCS) -> Path:
    """curate → synth → train (with an adapter folder) → merged, each DONE recording what it read."""
    curate = stage_folder(root / "curate", "curate", [{"id": f"d{i}", "text": t, "source": "test"}
                                                       for i, t in enumerate(docs)], [root / "raw.jsonl"])
    synth = stage_folder(root / "synth", "synth",
                         [{"id": f"p{i}", "doc_id": "d0", "generator": "test", "context": None, **p}
                          for i, p in enumerate(pairs)], [curate])
    train = stage_folder(root / "train", "train", [], [synth])
    (train / "adapter").mkdir()
    (train / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    stage_folder(root / "merged", "merge", [], [train])
    return root


def planted(task, **extra) -> dict:
    """The task copied into a pair as a synthesizer might: full-width digits, an extra line break."""
    text = task.prompt.translate(str.maketrans("0123456789", "０１２３４５６７８９")).replace("、", "、\n")
    return {"instruction": text, "response": task.reference, **extra}


def naive_share(text: str, training: list[str], n: int) -> float:
    """An independent count: each n-gram of the normalized text looked up by substring search in the joined
    normalized training texts (separated so no n-gram spans two of them)."""
    norm = contamination.normalize(text)
    haystack = "\0".join(contamination.normalize(t) for t in training)
    grams = {norm[i: i + n] for i in range(len(norm) - n + 1)}
    return sum(g in haystack for g in grams) / len(grams)


def test_provenance_found_from_a_merged_model_and_from_an_adapter(tmp_path):
    root = workdir(tmp_path, PAIRS)
    for model, adapter in ((str(root / "merged"), None), ("bundled:smollm2-135m-instruct", root / "train" / "adapter")):
        sources, missing = contamination.training_sources(model, adapter)
        assert [(s.stage, s.kind, s.path) for s in sources] == [
            ("synth", "pairs", (root / "synth").resolve()), ("curate", "documents", (root / "curate").resolve())]
        assert missing == []  # curate's raw input is not followed, so its absence is no concern
    assert contamination.training_sources("bundled:smollm2-135m-instruct", None) == ([], [])


def test_a_task_planted_in_the_synthesized_pairs_is_caught(tmp_path):
    items = tasks()
    target = items[3]
    root = workdir(tmp_path, [*PAIRS, planted(target)])
    result = contamination.run_check(items, str(root / "merged"), None, "warn", 13, 0.5)
    assert [f["task_id"] for f in result["flagged"]] == [target.id]
    flag = result["flagged"][0]
    assert flag["found_in"] == ["synth"]
    training = [p[k] for p in [*PAIRS, planted(target)] for k in ("instruction", "response")] + DOCS
    assert flag["input_share"] == pytest.approx(naive_share(target.prompt, training, 13), abs=1e-4)
    assert flag["reference_share"] == pytest.approx(naive_share(target.reference, training, 13), abs=1e-4)
    assert flag["input_share"] == 1.0 and flag["reference_share"] == 1.0
    assert [c["texts"] for c in result["checked_against"]] == [2 * 3, 2]  # 3 pairs x (user, assistant); 2 documents
    assert target.id in contamination.summary(result) and "1 of" in contamination.summary(result)


def test_a_reference_inside_a_curated_document_is_caught(tmp_path):
    items = tasks()
    target = items[0]
    root = workdir(tmp_path, PAIRS, [DOCS[0], "理科の時間のまとめ。" + target.reference + "次回は呼吸について学ぶ。"])
    result = contamination.run_check(items, str(root / "merged"), None, "warn", 13, 0.5)
    assert [(f["task_id"], f["found_in"]) for f in result["flagged"]] == [(target.id, ["curate"])]
    assert result["flagged"][0]["reference_share"] == 1.0
    assert result["flagged"][0]["input_share"] < 0.5


def test_clean_data_passes(tmp_path):
    items = tasks()
    root = workdir(tmp_path, PAIRS)
    result = contamination.run_check(items, str(root / "merged"), None, "warn", 13, 0.5)
    assert result["flagged"] == [] and result["tasks_checked"] == len(items)
    # The demo's own corpus (written for ezoforge, separately from its tasks) passes as well.
    web = contamination.Source("documents", "file", Path(bundled_data("bundled:web/fineweb-demo.parquet")))
    demo = contamination.check(items, [web], 13, 0.5)
    assert demo["flagged"] == [] and demo["checked_against"][0]["texts"] == 66
    assert "none of the" in contamination.summary(result)


def test_a_shared_set_phrase_is_not_contamination(tmp_path):
    """A pair that shares only a set phrase with a task (one 13-gram of its input) does not flag it."""
    task = tasks()[1]  # 「日本の伝統工芸品を3つ挙げ、それぞれの特徴を一文ずつ説明してください。」
    other = {"instruction": "味噌の作り方を一文ずつ説明してください。", "response": "大豆を煮て、麹と塩を混ぜ、寝かせます。"}
    share = naive_share(task.prompt, [other["instruction"]], 13)
    assert 0 < share < 0.1  # the phrase is shared, and it is a small part of the task
    root = workdir(tmp_path, [other])
    assert contamination.run_check([task], str(root / "merged"), None, "warn", 13, 0.5)["flagged"] == []
    # With a threshold below that share the same data is flagged: the share is what decides.
    assert contamination.run_check([task], str(root / "merged"), None, "warn", 13, share)["flagged"][0][
        "input_share"] == pytest.approx(share, abs=1e-4)


def test_off_checks_nothing_and_fail_names_the_tasks(tmp_path):
    items = tasks()
    root = workdir(tmp_path, [*PAIRS, planted(items[2])])
    off = contamination.run_check(items, str(root / "merged"), None, "off", 13, 0.5)
    assert off["flagged"] == [] and off["checked_against"] == [] and "off" in contamination.summary(off)
    with pytest.raises(EzoError, match=items[2].id + r" \(input 100%"):
        contamination.run_check(items, str(root / "merged"), None, "fail", 13, 0.5)


def test_eval_fails_before_loading_or_judging_anything(tmp_path):
    """`ezo eval` of an adapter trained on a planted task, under eval.contamination=fail: the error names the task,
    no answer was generated, no judge was asked, and the claimed output folder is gone."""
    from ezoforge.eval.run import run

    items = tasks()
    root = workdir(tmp_path, [*PAIRS, planted(items[4])])
    recipe = load_recipe(REPO / "recipes" / "demo.yaml",
                         [f"eval.tasks=[elyza100:{TASKS}]", "eval.contamination=fail",
                          "eval.judge_url=http://127.0.0.1:9/v1", "eval.judge_model=never-asked",
                          f"eval.cache={tmp_path / 'cache.sqlite'}"])
    out = tmp_path / "eval"
    with pytest.raises(EzoError, match=f"{items[4].id} .*nothing was judged"):
        run(recipe, out, adapter=root / "train" / "adapter")
    assert not out.exists()
    from ezoforge.cache import RequestCache

    cache = RequestCache(tmp_path / "cache.sqlite")
    assert len(cache) == 0  # no answer was generated, no verdict asked for
    cache.close()


def test_the_demo_run_records_the_check_in_stats_report_and_card(demo_run):
    """The tuned model of a real pipeline run: checked against its own synth and curate folders, in every report."""
    tuned = demo_run.workdir / "eval-tuned"
    stats = json.loads((tuned / "stats.json").read_text(encoding="utf-8"))
    result = stats["contamination"]
    assert {(c["stage"], c["kind"]) for c in result["checked_against"]} == {("synth", "pairs"), ("curate", "documents")}
    assert result["n"] == 13 and result["threshold"] == 0.5 and result["tasks_checked"] == 3
    report = json.loads((tuned / "report.json").read_text(encoding="utf-8"))
    assert report["contamination"] == result
    sentence = contamination.summary(result)
    assert escape(sentence) in (tuned / "report.html").read_text(encoding="utf-8")
    assert escape(sentence) in (demo_run.workdir / "report.html").read_text(encoding="utf-8")
    base = json.loads((demo_run.workdir / "eval-base" / "report.json").read_text(encoding="utf-8"))
    assert base["contamination"]["checked_against"] == []  # the base model has no training records of ours
    assert sentence in (demo_run.workdir / "export" / "README.md").read_text(encoding="utf-8")
