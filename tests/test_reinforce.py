"""`ezo reinforce`: GRPO continuing the SFT adapter, rewarded by named functions, the judge among them (scripted)."""
import json

import pytest

from ezoforge.errors import ConfigError
from ezoforge.reinforce import rewards
from ezoforge.reinforce import run as reinforce_run
from ezoforge.stages import load_recipe
from ezoforge.train.progress import read_metrics
from scripted_judge import ScriptedJudge, answer_of, expected_grade
from test_prefer import sft  # noqa: F401  (fixture: a finished SFT folder of the tiny model)
from trainkit import tiny_model  # noqa: F401  (fixture)

SMOKE = ["reinforce.max_steps=2", "reinforce.num_generations=2", "reinforce.batch_size=2",
         "reinforce.max_completion_length=6", "reinforce.held_out=2", "reinforce.limit=6", "reinforce.beta=0.1",
         "reinforce.learning_rate=5e-3", "reinforce.save_every=1", "reinforce.length_budget=3",
         "train.gradient_checkpointing=false"]
ALL = "{judge: 1.0, japanese: 0.5, length: 0.5, reference: 0.25, 'scripted_judge:answer_length': 0.1}"


def recipe(tiny_model, *more):  # noqa: F811
    return load_recipe(None, [f"model.name={tiny_model}", *SMOKE, *more])


def test_two_steps_with_every_kind_of_reward(tiny_model, sft, tmp_path):  # noqa: F811
    out = tmp_path / "rl"
    with ScriptedJudge() as judge:
        stats = reinforce_run.run(recipe(tiny_model, f"eval.judge_url={judge.url}", "eval.judge_model=scripted",
                                         f"reinforce.rewards={ALL}"), sft, out)
        asked = [json.dumps(r["messages"], ensure_ascii=False) for r in judge.requests]
        graded = {answer_of(r["messages"]) for r in judge.requests}
    assert stats["steps"] == 2 and stats["prompts"] == 4 and stats["held_out_prompts"] == 2
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    # The KL is to the starting (SFT) adapter: nothing has moved at the first step.
    assert rows[0]["kl"] == 0.0 and stats["kl_first"] == 0.0
    for name in ("judge", "japanese", "length", "reference", "answer_length"):
        assert rows[0][f"reward_{name}_mean"] is not None and rows[0][f"reward_{name}_std"] is not None, name
    # Every (prompt, completion) the judge graded was asked once: a completion that repeats is read from the cache.
    assert stats["judge_served"] == ["scripted-judge-2026-12-01"] and stats["judge_unusable"] == 0
    assert stats["judge_sent"] == len(set(asked)) == len(asked) and graded
    held = stats["before"]["held_out"]
    assert set(held) == {"judge", "japanese", "length", "reference", "answer_length", "reward", "completion_tokens"}
    assert 0 <= held["judge"] <= 1 and 0 <= held["japanese"] <= 1
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "rewards.png").is_file()
    assert json.loads((out / "DONE").read_text())["stage"] == "reinforce"
    assert not (out / "adapter" / "ref").exists()


def test_judge_grades_map_to_zero_one(tmp_path):
    from contextlib import ExitStack

    from ezoforge.cache import RequestCache
    from ezoforge.eval.settings import EvalConfig

    texts = ["a", "ab", "abc", "abcd", "abcde"]
    with ScriptedJudge() as judge, ExitStack() as stack:
        cache = RequestCache(tmp_path / "c.sqlite")
        stack.callback(cache.close)
        reward = rewards.JudgeReward(EvalConfig(judge_url=judge.url, judge_model="s"), cache, stack, None)
        got = reward([[{"role": "user", "content": "q"}]] * 5, [[{"role": "assistant", "content": t}] for t in texts],
                     instruction_id=[f"i{k}" for k in range(5)])
    assert got == [(expected_grade(t) - 1) / 4 for t in texts]


def test_a_judge_that_cannot_be_reached_stops_the_stage_instead_of_rewarding_nothing(tmp_path):
    import socket
    from contextlib import ExitStack

    from ezoforge.cache import RequestCache
    from ezoforge.errors import EzoError
    from ezoforge.eval.settings import EvalConfig

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ExitStack() as stack:
        cache = RequestCache(tmp_path / "c.sqlite")
        stack.callback(cache.close)
        reward = rewards.JudgeReward(EvalConfig(judge_url=f"http://127.0.0.1:{port}/v1", judge_model="s",
                                                judge_max_retries=0, judge_timeout=5), cache, stack, None)
        with pytest.raises(EzoError, match="judge requests failed .* rerun the same command to resume"):
            reward([[{"role": "user", "content": "q"}]], [[{"role": "assistant", "content": "a"}]],
                   instruction_id=["i0"])


@pytest.mark.parametrize("text, share", [("日本の首都は東京です。", 1.0), ("Tokyo is the capital.", 0.0),
                                         ("東京 is Tokyo", 2 / 9),
                                         ("はい・・・・・・", 1.0)])  # marks are not letters: no share above 1
def test_japanese_reward_is_the_share_of_japanese_letters(text, share):
    assert rewards.japanese([None], [[{"role": "assistant", "content": text}]]) == [pytest.approx(share)]


def test_length_reward_falls_past_the_budget():
    length = rewards.length_penalty(4)
    assert length([None] * 4, [None] * 4, completion_ids=[[1] * 3, [1] * 4, [1] * 6, [1] * 9]) == [1, 1, 0.5, 0]


def test_a_judge_reward_without_a_judge_fails_before_any_model_loads(tiny_model, sft, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="reinforce.rewards.judge grades with the recipe's judge"):
        reinforce_run.run(recipe(tiny_model, "reinforce.rewards={judge: 1.0}"), sft, tmp_path / "rl")
    assert not (tmp_path / "rl").exists()
    with pytest.raises(ConfigError, match="reinforce.rewards.nowhere:f: cannot import it"):
        reinforce_run.run(recipe(tiny_model, "reinforce.rewards={'nowhere:f': 1.0}"), sft, tmp_path / "rl")


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_same_losses_and_rewards(tiny_model, sft, tmp_path):  # noqa: F811
    from trainkit import train_until_killed

    more = ["reinforce.max_steps=4", "reinforce.rewards={japanese: 1.0, length: 1.0}"]
    straight = reinforce_run.run(recipe(tiny_model, *more), sft, tmp_path / "straight")
    killed = tmp_path / "killed"
    args = [str(sft), *(a for o in [f"model.name={tiny_model}", *SMOKE, *more] for a in ("--set", o))]
    train_until_killed(args, killed, step=2, command="reinforce")
    resumed = reinforce_run.run(recipe(tiny_model, *more), sft, killed)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    a, b = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "kl", "reward", "reward_japanese_mean", "reward_length_mean"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-5), (key, ra, rb)
    assert resumed["after"] == straight["after"]


def test_with_prefer_and_reinforce_each_continues_the_one_before_and_merge_folds_the_last(tmp_path):
    from ezoforge.stages import _tuned, steps

    recipe = load_recipe(None, ["stages=[curate,synth,train,prefer,reinforce,merge,eval]", "eval.judge_url=local",
                                "eval.judge_model=bundled:smollm2-135m-instruct"])
    read = {s: tmp_path / s for s in ("train", "prefer", "reinforce")}
    assert _tuned(recipe, read, before="prefer") == read["train"]
    assert _tuned(recipe, read, before="reinforce") == read["prefer"]  # GRPO continues DPO's adapter
    assert _tuned(recipe, read) == read["reinforce"]  # merge and eval-tuned take GRPO's
    assert steps(recipe) == ["curate", "synth", "train", "prefer", "reinforce", "merge", "eval-base", "eval-sft",
                             "eval-tuned"]
    alone = load_recipe(None, ["stages=[train,reinforce,merge]", "reinforce.rewards={japanese: 1.0}",
                               "reinforce.rewards.judge=0"])
    assert _tuned(alone, read, before="reinforce") == read["train"] and _tuned(alone, read) == read["reinforce"]
