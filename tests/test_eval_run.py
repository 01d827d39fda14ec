"""`ezo eval` end to end: the bundled model answers; a scripted judge with known verdicts grades over HTTP, and once
the bundled model itself, behind our real server, judges."""
import json
import math
import socket
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import BUNDLED, ezo_in_process
from ezoforge.cli import app
from ezoforge.config import DEFAULT_SYSTEM_PROMPT, bundled_data
from ezoforge.errors import EzoError
from ezoforge.eval.compare import compare
from ezoforge.eval.judge_prompt import PROMPT_VERSION
from ezoforge.eval.likelihood import jcqa_prompt
from ezoforge.eval.run import run
from ezoforge.eval.tasks import load_suite
from ezoforge.infer.generate import Generator, build_messages
from ezoforge.records import DONE, write_jsonl
from ezoforge.stages import load_recipe
from scripted_judge import FINGERPRINT, MODEL, ScriptedJudge, expected_grade

TASKS = f"elyza100:{bundled_data('bundled:tasks/demo-tasks.jsonl')}"  # the package's own ELYZA-format tasks
JCQA = "jglue/jcommonsenseqa/valid-v1.3.json"


def dead_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def make_recipe(cache: Path, max_new_tokens: int = 16, **eval_):
    return load_recipe(extra={"model": {"name": BUNDLED}, "eval": {
        "cache": str(cache), "generation": {"max_new_tokens": max_new_tokens}, **eval_}})


def stats(folder: Path) -> dict:
    return json.loads((folder / "stats.json").read_text(encoding="utf-8"))


def run_or_fail(recipe, out: Path) -> tuple[dict, str | None]:
    """(report, None), or (the report written, the error) when run refuses to give a mean."""
    try:
        return run(recipe, out), None
    except EzoError as e:
        return json.loads((out / "report.json").read_text(encoding="utf-8")), str(e)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-cache") / "requests.sqlite"


@pytest.fixture(scope="module")
def scripted():
    with ScriptedJudge() as judge:
        yield judge


@pytest.fixture(scope="module")
def judged(cache, scripted, tmp_path_factory):
    """Three tasks answered by the bundled model and judged over HTTP by the scripted judge, whose verdicts are
    known (scripted_judge.expected_grade): every grade below is checked exactly."""
    out = tmp_path_factory.mktemp("judged")
    recipe = make_recipe(cache, tasks=[TASKS], limit=3, judge_url=scripted.url, judge_model="scripted",
                         judge_reasks=0)
    return (out, recipe, *run_or_fail(recipe, out))


def test_judged_run_writes_consistent_outputs(judged):
    out, _, report, error = judged
    answers, judgements = rows(out / "answers.jsonl"), rows(out / "judgements.jsonl")
    tasks = load_suite(TASKS, 3).items
    assert [a["task_id"] for a in answers] == [j["task_id"] for j in judgements] == [t.id for t in tasks]
    asked = [a for a in answers if a["answer"].strip()]  # an empty answer is graded 1 without a request
    assert asked
    for j, a in zip(judgements, answers):
        assert j["grade"] == expected_grade(a["answer"]) and j["error"] is None
        assert j["judge"] == "scripted" and j["prompt_version"] == PROMPT_VERSION and j["answer"] == a["answer"]
        # what the judge reported serving, with its system fingerprint; nothing when no request was needed
        served = (MODEL, FINGERPRINT) if a["answer"].strip() else (None, None)
        assert (j["judge_served"], j["system_fingerprint"]) == served
    grades = [j["grade"] for j in judgements]
    assert report == json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert (report["n_tasks"], report["n_scored"], report["n_failed"]) == (3, 3, 0)
    judge = report["judge"]
    assert (judge["model"], judge["prompt_version"], judge["mixed"]) == ("scripted", PROMPT_VERSION, False)
    assert (judge["served"], judge["system_fingerprints"]) == ([MODEL], [FINGERPRINT])
    assert report["status"] == "complete" and error is None and (out / DONE).exists()
    assert report["mean_grade"] == round(sum(grades) / 3, 4)
    assert report["ci95"][0] <= report["mean_grade"] <= report["ci95"][1]
    # chrF recomputed independently with sacrebleu's defaults (which are char-level chrF)
    from sacrebleu.metrics import CHRF

    expected = CHRF().corpus_score([a["answer"] for a in answers], [[t.reference for t in tasks]]).score
    assert report["chrf"] == round(expected, 4)
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html and all(t.id in html for t in tasks)
    made = stats(out)
    assert made["answers_computed"] == 3 and made["judge_sent"] == len(asked)


def test_rerun_from_cache_is_identical_and_another_judge_url_is_not_a_hit(judged, tmp_path):
    out, recipe, _, error = judged
    assert (run_or_fail(recipe, tmp_path / "again")[1] is None) == (error is None)
    for name in ("report.json", "report.html", "answers.jsonl", "judgements.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    made = stats(tmp_path / "again")
    assert not made["model_loaded"] and made["answers_computed"] == 0 and made["judge_sent"] == 0
    elsewhere = recipe.model_copy(deep=True)
    elsewhere.eval.judge_url = dead_url()  # the same model name behind another URL may be another model
    _, failure = run_or_fail(elsewhere, tmp_path / "elsewhere")
    assert failure is not None and "judge request failed" in failure


def test_unreachable_judge_gives_no_scores_and_fails(judged, cache, tmp_path):
    # Same tasks and generation as `judged`, so answers come from the cache; the judge is new and unreachable.
    proc = ezo_in_process("eval", "--model", BUNDLED, "--tasks", TASKS, "--limit", "2", "--out", tmp_path,
                          "--judge-url", dead_url(), "--judge-model", "judge-x", "--max-new-tokens", "16",
                          "--set", f"eval.cache={cache}", "--set", "eval.judge_max_retries=0")
    assert proc.returncode == 1, proc.stderr
    assert "judgements failed" in proc.stderr
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert (report["n_scored"], report["n_failed"], report["mean_grade"], report["ci95"]) == (0, 2, None, None)
    assert report["status"] == "failed"
    assert all(j["grade"] is None and "judge request failed" in j["error"] for j in rows(tmp_path / "judgements.jsonl"))
    assert not (tmp_path / DONE).exists()


def test_no_judge_reports_not_judged(judged, cache, tmp_path):
    report = run(make_recipe(cache, tasks=[TASKS], limit=3), tmp_path)
    assert report["status"] == "not_judged" and report["judge"] is None
    assert (report["n_scored"], report["n_failed"], report["mean_grade"]) == (0, 0, None)
    assert report["chrf"] == judged[2]["chrf"] and not (tmp_path / "judgements.jsonl").exists()
    assert stats(tmp_path)["answers_computed"] == 0
    assert (tmp_path / DONE).exists()


def test_jcqa_accuracy_matches_predictions(cache, shared_data, bundled, tmp_path):
    spec = f"jcqa:{shared_data / JCQA}"
    report = run(make_recipe(cache, tasks=[spec], limit=6), tmp_path)
    preds = rows(tmp_path / "predictions.jsonl")
    items = load_suite(spec, 6).items
    assert [p["id"] for p in preds] == [it.id for it in items] and [p["label"] for p in preds] == [it.label for it in items]
    assert report["accuracy"] == round(sum(p["pred"] == p["label"] for p in preds) / 6, 4)
    assert report["accuracy_normalization"] == "sum" and report["n_choice_items"] == 6
    for p in preds:
        assert p["pred"] == max(range(5), key=lambda k: p["logprobs"][k])
    # The batched, padded scores equal a lone forward pass of one prompt + choice.
    gen, item = Generator(bundled), items[3]
    tok = bundled.tokenizer
    context = tok(gen.prompt_text(build_messages(jcqa_prompt(item), DEFAULT_SYSTEM_PROMPT)), add_special_tokens=False)["input_ids"]
    choice = tok(item.choices[4], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context + choice])
    with torch.inference_mode():
        logp = torch.log_softmax(bundled.model(input_ids=ids).logits[0, :-1].float(), -1)
    direct = sum(logp[len(context) - 1 + k, t].item() for k, t in enumerate(choice))
    assert preds[3]["logprobs"][4] == pytest.approx(direct, abs=1e-3)

PARAGRAPHS = [  # written for this test
    {"id": "p1", "text": "春になると、川沿いの桜並木には多くの人が集まり、夜遅くまでにぎわいます。"},
    {"id": "p2", "text": "この町の図書館は古い校舎を改装したもので、木の床がきしむ音まで残されています。"},
    {"id": "p3", "text": "朝の市場では、漁師が前の晩にとった魚を並べ、料理人たちが品定めをしていた。"},
]


def test_perplexity_is_token_weighted_mean_nll(cache, bundled, tmp_path):
    data = tmp_path / "held-out.jsonl"
    write_jsonl(data, PARAGRAPHS)
    report = run(make_recipe(cache, tasks=[f"ppl:{data}"]), tmp_path / "wide")
    nll, n = 0.0, 0
    for p in PARAGRAPHS:
        ids = torch.tensor([bundled.tokenizer(p["text"])["input_ids"]])
        with torch.inference_mode():
            logits = bundled.model(input_ids=ids).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        n += ids.shape[1] - 1
    assert report["ppl_tokens"] == n and report["n_passages"] == 3
    assert report["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    narrow = run(make_recipe(cache, tasks=[f"ppl:{data}"], ppl_window=8), tmp_path / "narrow")
    assert narrow["ppl_tokens"] == n  # windows overlap by one token, so each token is still predicted once
    assert narrow["perplexity"] != report["perplexity"]


def test_compare_pairs_grades_on_shared_tasks(tmp_path):
    def folder(name: str, grades: list[int | None], judge: str = "j") -> Path:
        d = tmp_path / name
        judgements = [{"task_id": f"elyza100/{i}", "model": name, "answer": "a", "judge": judge, "grade": g,
                       "error": None if g else "judge request failed", "reason": "", "prompt_version": "v"}
                      for i, g in enumerate(grades, 1)]
        write_jsonl(d / "judgements.jsonl", judgements)
        scored = [g for g in grades if g]
        (d / "report.json").write_text(json.dumps({
            "model": {"name": name}, "judge": {"model": judge, "prompt_version": "v"}, "tasks": ["elyza100"],
            "status": "complete",
            "n_tasks": len(grades), "n_scored": len(scored), "n_failed": len(grades) - len(scored),
            "mean_grade": sum(scored) / len(scored), "ci95": [1.0, 5.0], "chrf": 10.0, "accuracy": None,
            "perplexity": None, "bootstrap": {"samples": 1000, "seed": 0}}), encoding="utf-8")
        return d

    base = folder("base", [1, 2, 3, 4, 2])
    tuned = folder("tuned", [2, 3, 4, 5, None])  # task 5 failed: only tasks 1-4 are paired
    other = folder("other-judge", [5, 5, 5, 5, 5], judge="k")
    with pytest.raises(EzoError, match="judged by j / v but other-judge by k / v"):
        compare([base, tuned, other])
    result = compare([base, tuned, other], tmp_path / "cmp", allow_different_judges=True)
    diff = result["runs"][1]["diff"]
    assert (diff["n"], diff["diff"], diff["ci95"]) == (4, 1.0, [1.0, 1.0])
    assert result["runs"][0]["diff"] is None and result["runs"][2]["diff"] is None
    assert any("other-judge" in n and "not paired" in n for n in result["notes"])
    assert "data:image/png;base64," in (tmp_path / "cmp" / "compare.html").read_text(encoding="utf-8")


def test_compare_cli_on_real_runs(judged, tmp_path):
    out = judged[0]
    res = CliRunner().invoke(app, ["eval", "compare", str(out), str(out), "--out", str(tmp_path)], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "compare.json").read_text(encoding="utf-8"))
    diff = result["runs"][1]["diff"]
    assert (diff["diff"], diff["ci95"], diff["n"]) == (0.0, [0.0, 0.0], 3)
    assert "mean_grade" in res.output


def test_missing_model_fails_before_claiming_the_folder(tmp_path):
    """A typo in --model must not leave a half-made folder that a corrected rerun would then refuse."""
    out = tmp_path / "eval"
    tasks = tmp_path / "x.jsonl"
    tasks.write_text('{"text": "梅雨は雨季の一種である。"}\n', encoding="utf-8")
    recipe = load_recipe(None, [f"model.name={tmp_path / 'no-such-model'}", f"eval.tasks=[ppl:{tasks}]"])
    with pytest.raises(EzoError, match="no such model folder"):
        run(recipe, out)
    assert not out.exists()


def test_eval_without_out_is_a_config_error():
    with pytest.raises(EzoError, match="--out"):
        CliRunner().invoke(app, ["eval", "--model", BUNDLED], catch_exceptions=False)


def test_local_judge_via_cli(tmp_path):
    """`--judge-url local`, the one real judge in `make test`: the bundled model served in-process on loopback,
    reached over HTTP, its verdict decoded under the verdict's schema (a reason of at most 10 characters fits in
    64 tokens, so the verdict is always whole)."""
    proc = ezo_in_process("eval", "--model", BUNDLED, "--tasks", TASKS, "--limit", "1", "--out", tmp_path / "out",
                          "--judge-url", "local", "--judge-model", BUNDLED, "--max-new-tokens", "16",
                          "--set", f"eval.cache={tmp_path / 'c.sqlite'}", "--set", "eval.judge_max_tokens=64",
                          "--set", "eval.judge_reason_max_chars=10", "--set", "eval.judge_reasks=0")
    assert proc.returncode == 0, proc.stderr
    (judgement,) = rows(tmp_path / "out" / "judgements.jsonl")
    assert judgement["judge"] == judgement["judge_served"] == BUNDLED and judgement["grade"] in range(1, 6)
    assert len(judgement["reason"]) <= 10 and stats(tmp_path / "out")["judge_sent"] == 1
