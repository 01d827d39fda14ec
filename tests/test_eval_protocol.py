"""Samples x judgments, the judge as it answered, `ezo eval compare`'s refusal, and Japanese MT-Bench's two turns.

The answering model is the bundled SmolLM2; the judge is tests/scripted_judge.py on loopback, so grades are known."""
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from conftest import BUNDLED
from ezoforge.cache import RequestCache, request_key
from ezoforge.errors import ConfigError, RecordError
from ezoforge.eval.compare import compare
from ezoforge.eval.eval_report import DIFFERENT_JUDGES
from ezoforge.eval.mt_bench import PROMPTS, parse_rating
from ezoforge.eval.run import run
from ezoforge.eval.task_types.judged import grade_summary
from ezoforge.infer.generate import Sampling, build_messages
from ezoforge.models import model_identity
from ezoforge.records import read_eval_report, read_judgements, write_json, write_jsonl
from ezoforge.stages import load_recipe
from scripted_judge import FINGERPRINT, MODEL, ScriptedJudge

# Written for these tests.
ELYZA_TASKS = [
    {"input": "日本の首都はどこですか？", "output": "東京です。", "eval_aspect": "- 東京と答えていれば5点"},
    {"input": "「山」を使った短い俳句を一つ作ってください。", "output": "山眠る 夕日の影に 鐘の音", "eval_aspect": ""},
]
MT_QUESTIONS = [
    {"question_id": 1, "category": "writing",
     "turns": ["春の京都を紹介する短い文章を書いてください。", "その文章を小学生向けに書き直してください。"]},
    {"question_id": 2, "category": "math",
     "turns": ["3 + 4 × 2 はいくつですか？", "では (3 + 4) × 2 はいくつですか？"]},
]
MT_REFERENCES = [  # FastChat's answer format, as in Japanese MT-Bench's reference_answer/*.jsonl
    {"question_id": 2, "answer_id": "ref-2", "model_id": "reference", "choices": [{"index": 0, "turns": ["11です。", "14です。"]}]},
]
# The scripted judge's rating for each MT-Bench prompt, so every per-category and per-turn figure is known.
RATINGS = {"single-v1": 3, "single-v1-multi-turn": 6, "single-math-v1": 8, "single-math-v1-multi-turn": 9}


def prompt_name(messages: list[dict]) -> str:
    """Which FastChat prompt a judge request was built from (its system text and the template's opening)."""
    found = [name for name, p in PROMPTS.items()
             if messages[0]["content"] == p.system and messages[1]["content"].startswith(p.template.split("{", 1)[0])]
    assert len(found) == 1, messages
    return found[0]


def rate_by_prompt(messages: list[dict]) -> str:
    return f"The answer is judged by its prompt. Rating: [[{RATINGS[prompt_name(messages)]}]]"


def make_recipe(cache: Path, tasks: list[str], judge_url: str, max_new_tokens: int = 8, **eval_):
    return load_recipe(extra={"model": {"name": BUNDLED}, "eval": {
        "cache": str(cache), "tasks": tasks, "judge_url": judge_url, "judge_model": "gpt-judge", "backend": "transformers",
        "generation": {"max_new_tokens": max_new_tokens, "temperature": 0.7}, "judge_temperature": 0.7, **eval_}})


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def stats_of(folder: Path) -> dict:
    return json.loads((folder / "stats.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("protocol-cache") / "requests.sqlite"


@pytest.fixture(scope="module")
def elyza(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tasks") / "elyza.jsonl"
    write_jsonl(path, ELYZA_TASKS)
    return f"elyza100:{path}"


# ---------------------------------------------------------------- aggregation


def test_aggregation_matches_an_independent_computation():
    # 6 tasks, 3 samples x 3 judgments each, non-constant, one task with two failed verdicts (so counts differ).
    rng = np.random.default_rng(7)
    judgements = [{"task_id": f"elyza100/{t}", "grade": int(rng.integers(1, 6)), "error": None}
                  for t in range(6) for _ in range(9)]
    for j in judgements[9:11]:
        j["grade"], j["error"] = None, "judge request failed"
    summary = grade_summary(judgements, 6, True, True, 2000, 11)
    per_task = {}
    for j in judgements:
        if j["grade"] is not None:
            per_task.setdefault(j["task_id"], []).append(j["grade"])
    means = [statistics.fmean(g) for g in per_task.values()]
    assert len(set(means)) > 1 and len(per_task["elyza100/1"]) == 7
    assert summary["mean_grade"] == round(statistics.fmean(means), 4)
    # The mean of task means, not of all verdicts: the task with fewer verdicts weighs the same as the others.
    assert summary["mean_grade"] != round(statistics.fmean(g for gs in per_task.values() for g in gs), 4)
    # The same seeded bootstrap over tasks, written as a plain loop of resamples.
    draw = np.random.default_rng(11)
    boots = sorted(statistics.fmean(means[i] for i in draw.integers(0, len(means), size=len(means)))
                   for _ in range(2000))
    assert summary["ci95"] == [round(float(np.percentile(boots, q)), 4) for q in (2.5, 97.5)]
    # And scipy's own percentile bootstrap agrees within resampling noise.
    res = scipy_stats.bootstrap((np.array(means),), np.mean, n_resamples=20000, method="percentile", random_state=0)
    assert summary["ci95"][0] == pytest.approx(res.confidence_interval.low, abs=0.12)
    assert summary["ci95"][1] == pytest.approx(res.confidence_interval.high, abs=0.12)
    spread = [statistics.stdev(g) for g in per_task.values()]
    assert summary["task_spread"]["mean_std"] == round(statistics.fmean(spread), 4)
    assert summary["task_spread"]["max_range"] == max(max(g) - min(g) for g in per_task.values())


def test_repeats_that_cannot_differ_are_refused():
    with pytest.raises(ConfigError, match=r"samples=3 with generation.temperature=0"):
        load_recipe(extra={"eval": {"samples": 3}})
    with pytest.raises(ConfigError, match=r"judgments=3 with judge_temperature=0"):
        load_recipe(extra={"eval": {"judgments": 3}})


# ---------------------------------------------------------------- samples x judgments end to end


@pytest.fixture(scope="module")
def raised(cache, elyza, tmp_path_factory):
    """The same tasks at 1 x 1, then at 2 x 2 with the same cache and judge."""
    base = tmp_path_factory.mktemp("raised")
    with ScriptedJudge() as judge:
        one = run(make_recipe(cache, [elyza], judge.url), base / "1x1")
        two = run(make_recipe(cache, [elyza], judge.url, samples=2, judgments=2), base / "2x2")
        return base, one, two, judge.requests


def test_raising_samples_and_judgments_reuses_what_is_stored(raised):
    base, _, two, _ = raised
    answers = jsonl(base / "2x2" / "answers.jsonl")
    assert [(a["task_id"], a["sample"]) for a in answers] == [("elyza100/1", 0), ("elyza100/1", 1),
                                                               ("elyza100/2", 0), ("elyza100/2", 1)]
    first = stats_of(base / "1x1")
    assert (first["answers_computed"], first.get("answers_cached", 0)) == (2, 0)
    asked = [bool(a["answer"].strip()) for a in answers]  # an empty answer is graded 1 without a request
    assert first["judge_sent"] == sum(asked[0::2])
    again = stats_of(base / "2x2")
    assert (again["answers_computed"], again["answers_cached"]) == (2, 2)  # only sample 1 is new
    # Judgment 0 of each sample-0 answer is stored; judgment 1 and all of sample 1 are new.
    assert again["judge_cached"] == sum(asked[0::2])
    assert again["judge_sent"] == 2 * sum(asked) - sum(asked[0::2])
    assert two["protocol"] == {"samples": 2, "judgments": 2, "temperature": 0.7, "judge_temperature": 0.7}


def test_task_score_is_the_mean_over_samples_and_judgments(raised):
    base, one, two, _ = raised
    judgements = jsonl(base / "2x2" / "judgements.jsonl")
    assert len(judgements) == 8 and {(j["sample"], j["judgment"]) for j in judgements} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    per_task = {}
    for j in judgements:
        per_task.setdefault(j["task_id"], []).append(j["grade"])
    means = [statistics.fmean(g) for g in per_task.values()]
    assert two["mean_grade"] == round(statistics.fmean(means), 4)
    draw = np.random.default_rng(two["bootstrap"]["seed"])
    boots = [statistics.fmean(means[i] for i in draw.integers(0, 2, size=2)) for _ in range(two["bootstrap"]["samples"])]
    assert two["ci95"] == [round(float(np.percentile(boots, q)), 4) for q in (2.5, 97.5)]
    assert [(t["task_id"], t["n"], t["min"], t["max"]) for t in two["per_task"]] == [
        (t, 4, min(g), max(g)) for t, g in per_task.items()]
    html = (base / "2x2" / "report.html").read_text(encoding="utf-8")
    assert "Grades within each task" in html and "Sample 2, turn 1" in html and "Judgment 2" in html
    assert stats_of(base / "2x2")["task_spread"] == two["task_spread"]
    # 1 x 1 is the old protocol: one verdict per task.
    assert one["n_scored"] == 2 and [t["n"] for t in one["per_task"]] == [1, 1]


# ---------------------------------------------------------------- the judge as it answered


def test_each_verdict_records_the_judge_as_served(raised):
    base, _, two, requests = raised
    judgements = jsonl(base / "2x2" / "judgements.jsonl")
    asked = [j for j in judgements if j["reason"] != "empty answer: graded 1 without a judge call"]
    assert asked and all((j["judge"], j["judge_served"], j["system_fingerprint"]) == ("gpt-judge", MODEL, FINGERPRINT)
                         for j in asked)
    assert two["judge"]["served"] == [MODEL] and two["judge"]["system_fingerprints"] == [FINGERPRINT]
    assert not two["judge"]["mixed"] and two["judge"]["notes"] == []
    made = stats_of(base / "2x2")
    assert made["judge_served"] == [MODEL] and made["judge_mixed"] is False
    # Each judgment index is its own request, at the judge temperature, seeded by its index.
    assert {(r["temperature"], r["seed"]) for r in requests} == {(0.7, 0), (0.7, 1)}


def test_a_judge_version_change_within_an_eval_is_reported(cache, elyza, raised, tmp_path):
    def switching(messages):
        from scripted_judge import by_length

        if len(judge.requests) > 1:  # the server moves to a newer version after the first request
            judge.model, judge.fingerprint = "scripted-judge-2027-01-01", "fp_scripted_0002"
        return by_length(messages)

    with ScriptedJudge(switching) as judge:  # a new URL: nothing of its is cached; the answers are
        report = run(make_recipe(cache, [elyza], judge.url, samples=2, judgments=2, concurrency=1), tmp_path)
    served = {j["judge_served"] for j in jsonl(tmp_path / "judgements.jsonl")} - {None}
    assert served == {MODEL, "scripted-judge-2027-01-01"}
    assert report["judge"]["served"] == sorted(served) and report["judge"]["mixed"]
    assert any("2 different models" in n and MODEL in n for n in report["judge"]["notes"])
    made = stats_of(tmp_path)
    assert made["judge_mixed"] is True and made["judge_served"] == sorted(served)
    assert made["judge_fingerprints"] == [FINGERPRINT, "fp_scripted_0002"]
    assert "2 different models" in (tmp_path / "report.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------- compare refuses different judges


def _main(monkeypatch, *argv) -> int:
    from ezoforge.cli import main

    monkeypatch.setattr(sys, "argv", ["ezo", *argv])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code


def test_compare_refuses_evals_under_different_judges(cache, elyza, raised, tmp_path, monkeypatch, capsys):
    base = raised[0]
    with ScriptedJudge(model="other-judge-2025-05-05") as judge:
        run(make_recipe(cache, [elyza], judge.url), tmp_path / "other")
    with pytest.raises(ConfigError, match="other-judge-2025-05-05.*--allow-different-judges"):
        compare([base / "1x1", tmp_path / "other"])
    assert _main(monkeypatch, "eval", "compare", str(base / "1x1"), str(tmp_path / "other")) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert MODEL in err and "other-judge-2025-05-05" in err
    # The same judge as served: compared and paired.
    assert compare([base / "1x1", base / "2x2"])["runs"][1]["diff"]["n"] == 2
    # --allow-different-judges shows them, marked, and pairs nothing across judges.
    monkeypatch.setenv("COLUMNS", "300")
    assert _main(monkeypatch, "eval", "compare", str(base / "1x1"), str(tmp_path / "other"), "--out",
                 str(tmp_path / "cmp"), "--allow-different-judges") == 0
    assert DIFFERENT_JUDGES in capsys.readouterr().out.replace("\n", "").replace("│", "")
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text(encoding="utf-8"))
    assert result["different_judges"] and result["runs"][1]["diff"] is None
    assert DIFFERENT_JUDGES in (tmp_path / "cmp" / "compare.html").read_text(encoding="utf-8")


def test_compare_refuses_a_different_judge_prompt(raised, tmp_path):
    base = raised[0]
    changed = tmp_path / "changed"
    changed.mkdir()
    report = json.loads((base / "1x1" / "report.json").read_text(encoding="utf-8"))
    report["judge"]["prompt_version"] = "ezo-judge-ja-v0"
    (changed / "report.json").write_text(json.dumps(report), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"ezo-judge-ja-v1.*ezo-judge-ja-v0"):
        compare([base / "1x1", changed])


# ---------------------------------------------------------------- Japanese MT-Bench


@pytest.fixture(scope="module")
def mt_bench(cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mt-bench")
    write_jsonl(folder / "question.jsonl", MT_QUESTIONS)
    write_jsonl(folder / "reference.jsonl", MT_REFERENCES)
    with ScriptedJudge(rate_by_prompt) as judge:
        recipe = make_recipe(cache, [f"mt-bench-ja:{folder / 'question.jsonl'}"], judge.url,
                             mt_bench_references=str(folder / "reference.jsonl"))
        report = run(recipe, folder / "out")
        return folder / "out", recipe, report, judge.requests


def test_mt_bench_asks_the_second_turn_after_the_models_own_first_answer(mt_bench, cache):
    out, recipe, _, requests = mt_bench
    answers = jsonl(out / "answers.jsonl")
    assert [(a["task_id"], a["turn"]) for a in answers] == [("mt-bench-ja/1", 1), ("mt-bench-ja/1", 2),
                                                            ("mt-bench-ja/2", 1), ("mt-bench-ja/2", 2)]
    m, g = recipe.model, recipe.eval.generation
    fp = model_identity(m.name, None, m.dtype, m.device, m.chat_template)
    store = RequestCache(cache)
    try:
        for q, (first, second) in zip(MT_QUESTIONS, zip(answers[0::2], answers[1::2])):
            # The second turn's request is the conversation holding the first turn's answer.
            conversation = build_messages(q["turns"][0], m.system_prompt) + [
                {"role": "assistant", "content": first["answer"]}, {"role": "user", "content": q["turns"][1]}]
            key = request_key(kind="answer", model=fp, messages=conversation,
                              sampling=asdict(Sampling.from_config(g)), sample=0)  # sample 0: the recipe's seed
            assert store.get(key)["text"] == second["answer"]
    finally:
        store.close()
    # The turn-2 judge request quotes both turns and both of the model's answers.
    turn2 = [r for r in requests if prompt_name(r["messages"]).endswith("multi-turn")]
    assert len(turn2) == 2
    for q, (first, second) in zip(MT_QUESTIONS, zip(answers[0::2], answers[1::2])):
        user = next(r["messages"][1]["content"] for r in turn2 if q["turns"][1] in r["messages"][1]["content"])
        assert (f"### User:\n{q['turns'][0]}\n\n### Assistant A:\n{first['answer']}\n\n### User:\n{q['turns'][1]}\n\n"
                f"### Assistant A:\n{second['answer']}\n\n") in user


def test_mt_bench_judge_prompt_is_chosen_per_category_and_turn(mt_bench):
    out, _, _, requests = mt_bench
    judgements = jsonl(out / "judgements.jsonl")
    assert [(j["task_id"], j["turn"], j["prompt"]) for j in judgements] == [
        ("mt-bench-ja/1", 1, "single-v1"), ("mt-bench-ja/1", 2, "single-v1-multi-turn"),
        ("mt-bench-ja/2", 1, "single-math-v1"), ("mt-bench-ja/2", 2, "single-math-v1-multi-turn")]
    assert sorted(prompt_name(r["messages"]) for r in requests) == sorted(RATINGS)
    by_prompt = {prompt_name(r["messages"]): r["messages"][1]["content"] for r in requests}
    # Reference-guided for math, with the reference answers of the reference file; none for writing.
    assert "[The Start of Reference Answer]\n11です。\n[The End of Reference Answer]" in by_prompt["single-math-v1"]
    assert "### Reference answer:\n11です。" in by_prompt["single-math-v1-multi-turn"]
    assert "### Reference answer:\n14です。" in by_prompt["single-math-v1-multi-turn"]
    assert "Reference" not in by_prompt["single-v1"] + by_prompt["single-v1-multi-turn"]
    assert all("response_format" not in r for r in requests)  # FastChat's free-text verdicts
    assert [j["grade"] for j in judgements] == [3, 6, 8, 9]


def test_mt_bench_scores_per_category_turn_and_overall(mt_bench):
    _, _, report, _ = mt_bench
    assert report["scale"] == [1, 10] and report["prompt_version"] == "fastchat-mt-bench-single-v1"
    assert report["mean_grade"] == (4.5 + 8.5) / 2
    figures = report["mt_bench"]
    assert {c: f["mean_grade"] for c, f in figures["by_category"].items()} == {"math": 8.5, "writing": 4.5}
    assert {t: f["mean_grade"] for t, f in figures["by_turn"].items()} == {"1": 5.5, "2": 7.5}
    html = (mt_bench[0] / "report.html").read_text(encoding="utf-8")
    assert "MT-Bench writing (1–10)" in html and "6.50 of 10" in html


def test_mt_bench_without_references_fails_before_any_work(tmp_path, cache):
    questions = tmp_path / "q.jsonl"
    write_jsonl(questions, MT_QUESTIONS)
    recipe = make_recipe(cache, [f"mt-bench-ja:{questions}"], "http://127.0.0.1:9/v1")
    with pytest.raises(RecordError, match=r"mt-bench-ja/2 \(math\) has 0 reference answer\(s\).*mt_bench_references"):
        run(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("raw,grade", [
    ("The answer is correct and well written. Rating: [[8]]", 8),
    ("評価：［［７］］", 7),  # full-width brackets and digit
    ("Rating: [[8.5]]", 8.5),  # FastChat reads decimals
    ("Rating: [6]", 6),  # FastChat's backup pattern
    ("Rating: [[11]]", None),
    ("[[3]] at first, but on reflection [[7]]", None),
    ('Output format: "[[rating]]"', None),
])
def test_parse_rating(raw, grade):
    assert parse_rating(raw).grade == grade


def test_a_verdict_row_is_read_as_the_judge_client_wrote_it_or_refused_by_line_and_field(tmp_path):
    row = {"task_id": "elyza100/1", "model": "m", "answer": "はい", "judge": "j", "grade": 4, "error": None,
           "reason": "良い", "prompt_version": "ezo-judge-ja-v1", "prompt": None, "sample": 0, "turn": 1,
           "judgment": 0, "judge_served": "j", "system_fingerprint": None}
    path = tmp_path / "judgements.jsonl"
    write_jsonl(path, [row, {**row, "task_id": "elyza100/2", "grade": "high"}])
    with pytest.raises(RecordError, match=r"judgements.jsonl:2: grade: "):
        read_judgements(path)
    write_jsonl(path, [row])
    assert read_judgements(path) == [row] and read_judgements(tmp_path / "none.jsonl") == []


def test_an_eval_report_is_read_as_written_or_refused_by_file_and_field(tmp_path):
    report = {"model": {"spec": "m", "adapter": False}, "judge": None, "tasks": ["elyza100"], "n_tasks": 3,
              "status": "complete", "mean_grade": 3.5}  # a Scoring's figures ride beside the header
    path = tmp_path / "report.json"
    write_json(path, report)
    assert read_eval_report(path) == report and list(read_eval_report(path)) == list(report)
    write_json(path, {k: v for k, v in report.items() if k != "status"})
    with pytest.raises(RecordError, match=r"report.json: status: Field required"):
        read_eval_report(path)
