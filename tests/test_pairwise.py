"""`ezo eval compare A B --pairwise` against a scripted judge whose verdicts are known: planted better answers win,
a planted position bias shows as disagreements between the two orders (ties), and verdicts are cached."""
import json
import re
from pathlib import Path

import pytest

from conftest import ezo_in_process
from ezoforge.eval.pairwise import parse_winner
from scripted_judge import ScriptedJudge

TASKS = 20
BETTER = "（詳しく正確な回答）"
_ANSWER = re.compile(r"# アシスタント([AB])の回答\n(.*?)(?=\n\n#)", re.S)
_TASK = re.compile(r"# 問題\n問題(\d+)")


def prefers_the_planted(biased: set[int] = frozenset()):
    """A judge that names the answer holding BETTER (a tie when both or neither do); on the tasks in `biased` it
    names A whatever it reads, as a judge with a position bias does."""
    def script(messages: list[dict]) -> str:
        text = messages[1]["content"]
        if int(_TASK.search(text).group(1)) in biased:
            return json.dumps({"reason": "最初の回答", "winner": "A"}, ensure_ascii=False)
        better = {who for who, answer in _ANSWER.findall(text) if BETTER in answer}
        winner = better.pop() if len(better) == 1 else "tie"
        return json.dumps({"reason": "比較した", "winner": winner}, ensure_ascii=False)
    return script


def eval_folder(root: Path, name: str, better: bool) -> Path:
    """An eval output as `ezo eval` writes it (answers.jsonl, report.json), two samples per task."""
    folder = root / name
    folder.mkdir()
    rows = [{"task_id": f"elyza100/{t}", "sample": s, "turn": 1, "prompt": f"問題{t}: 日本の山について説明してください。",
             "reference": "富士山は日本で最も高い山です。",
             "answer": f"富士山は高い山です（{s}）。{BETTER if better else ''}"} for t in range(TASKS) for s in range(2)]
    (folder / "answers.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    judge = {"model": "scripted", "served": ["scripted-judge-2026-12-01"], "prompt_version": "ezo-judge-ja-v1"}
    (folder / "report.json").write_text(json.dumps({"model": {"name": name}, "judge": judge, "tasks": ["elyza100"],
                                                    "n_tasks": TASKS, "status": "complete"}))
    return folder


def compare_pairwise(judge, *folders, out: Path):
    return ezo_in_process("eval", "compare", *folders, "--pairwise", "--judge-url", judge.url, "--judge-model",
                          "scripted", "--out", out, "--set", f"eval.cache={out.parent / 'cache.sqlite'}")


def test_planted_better_answers_win_and_lose_when_reversed(tmp_path):
    base, tuned = eval_folder(tmp_path, "eval-base", better=False), eval_folder(tmp_path, "eval-tuned", better=True)
    with ScriptedJudge(prefers_the_planted()) as judge:
        forward = compare_pairwise(judge, base, tuned, out=tmp_path / "forward")
        assert forward.returncode == 0, forward.stderr
        asked = len(judge.requests)
        assert asked == TASKS * 2 * 2  # every pair (task x sample) in both orders
        reverse = compare_pairwise(judge, tuned, base, out=tmp_path / "reverse")
        assert reverse.returncode == 0, reverse.stderr
        again = compare_pairwise(judge, base, tuned, out=tmp_path / "again")
        # The reverse run asks the same pairs in the same two orders, the repeat the same again: all from the cache.
        assert len(judge.requests) == asked
    won = json.loads((tmp_path / "forward" / "pairwise.json").read_text())["against"][0]
    lost = json.loads((tmp_path / "reverse" / "pairwise.json").read_text())["against"][0]
    assert won["win_rate"] >= 0.95 and lost["win_rate"] <= 0.05, (won, lost)
    assert (won["wins"], won["ties"], won["losses"], won["pairs"]) == (2 * TASKS, 0, 0, 2 * TASKS)
    assert won["ci95"][0] <= won["win_rate"] <= won["ci95"][1] and won["disagreements"] == 0
    assert won["per_task"]["elyza100/3"] == {"win": 2, "tie": 0, "loss": 0, "failed": 0}
    assert json.loads((tmp_path / "again" / "pairwise.json").read_text()) == \
        json.loads((tmp_path / "forward" / "pairwise.json").read_text())
    verdicts = [json.loads(line) for line in (tmp_path / "forward" / "verdicts.jsonl").read_text().splitlines()]
    assert len(verdicts) == 2 * TASKS and all(v["orders"] == ["win", "win"] for v in verdicts)
    assert "win rate" in forward.stderr + forward.stdout


def test_a_position_bias_shows_as_the_disagreements_planted(tmp_path):
    base, tuned = eval_folder(tmp_path, "eval-base", better=False), eval_folder(tmp_path, "eval-tuned", better=True)
    biased = {1, 4, 9, 16}
    with ScriptedJudge(prefers_the_planted(biased)) as judge:
        assert compare_pairwise(judge, base, tuned, out=tmp_path / "out").returncode == 0
    result = json.loads((tmp_path / "out" / "pairwise.json").read_text())["against"][0]
    assert result["disagreements"] == 2 * len(biased)  # both samples of each biased task
    assert result["ties"] == 2 * len(biased) and result["wins"] == 2 * (TASKS - len(biased))
    assert result["win_rate"] == pytest.approx((result["wins"] + result["ties"] / 2) / (2 * TASKS))
    assert result["per_task"]["elyza100/4"] == {"win": 0, "tie": 2, "loss": 0, "failed": 0}


def test_evals_graded_by_different_judges_are_refused(tmp_path):
    base, tuned = eval_folder(tmp_path, "eval-base", better=False), eval_folder(tmp_path, "eval-tuned", better=True)
    report = json.loads((tuned / "report.json").read_text())
    report["judge"]["served"] = ["another-judge"]
    (tuned / "report.json").write_text(json.dumps(report))
    with ScriptedJudge(prefers_the_planted()) as judge:
        refused = compare_pairwise(judge, base, tuned, out=tmp_path / "out")
        assert refused.returncode == 2 and "different judges" in refused.stderr and not judge.requests


@pytest.mark.parametrize("reply, winner", [
    ('{"reason": "Bが良い", "winner": "B"}', "B"),
    ('理由…\n{"reason": "同等", "winner": "tie"}', "tie"),
    ('{"winner": "引き分け"}', "tie"),
    ("Aの方が正確です。[[A]]", "A"),
    ("[[C]]", "tie"),
    ('{"winner": "A"} {"winner": "B"}', None),
    ("どちらも良い", None),
])
def test_the_winner_is_read_strictly(reply, winner):
    from ezoforge.eval.pairwise import WINNERS

    verdict = parse_winner(reply)
    assert (None if verdict.grade is None else WINNERS[verdict.grade]) == winner


def test_a_stated_pairwise_step_without_a_judge_fails_when_the_recipe_loads():
    from ezoforge.errors import ConfigError
    from ezoforge.stages import load_recipe

    with pytest.raises(ConfigError, match="pairwise: true needs a judge"):
        load_recipe(None, ["eval.pairwise=true"])


def test_the_plan_counts_the_pairwise_step_as_the_judge_alone():
    """No answers are generated there: no hours of its own, no disk, and on the card only the local judge."""
    from conftest import DEMO
    from ezoforge.plan import plan
    from ezoforge.stages import load_recipe

    stages = plan(load_recipe(DEMO))["stages"]
    assert stages["pairwise"]["hours"] is None and stages["pairwise"]["disk_gib"] == 0.0
    assert 0 < stages["pairwise"]["gpu_gib"] <= stages["eval-tuned"]["gpu_gib"]
