"""The rewards reinforce trains on, by name (the recipe's `reinforce.rewards`, name -> weight).

Each is a function TRL's GRPOTrainer calls with a batch's prompts and completions (and the dataset's columns); its
`__name__` is the name metrics.jsonl logs it under (`reward_NAME_mean`, `reward_NAME_std`). Ours score in [0, 1]:

- `judge`: the recipe's judge grades the completion on ELYZA-tasks-100's 1-5 rubric (eval's client, prompt and cache
  keys), mapped to [0, 1]; an unusable verdict gives no reward (None, which TRL leaves out of the mean), a failed
  request stops the stage (a rerun resumes).
- `japanese`: the share of the completion's letters that are kana or kanji (`text.japanese_ratio`).
- `length`: 1 up to `reinforce.length_budget` completion tokens, falling to 0 at twice that.
- `reference`: chrF (0-100, scaled to 0-1) against the synthesized response.
- `module:function`: a user's function, called as function(prompt, completion) -> float for each completion.

`build` makes them all before any model loads, so a stated reward that cannot run fails first.
"""
from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from contextlib import ExitStack

from ezoforge.cache import RequestCache
from ezoforge.errors import ConfigError, EzoError
from ezoforge.eval.settings import EvalConfig
from ezoforge.reinforce.settings import ReinforceConfig
from ezoforge.text import japanese_ratio

Reward = Callable[..., list]
RESERVED = {"reward", "completion_tokens"}  # the scores' own figures beside each reward's (grpo.score)


def text_of(completion) -> str:
    """A completion as TRL hands it: conversational (a list of messages) or plain text."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def prompt_of(prompt) -> str:
    """The user's turn of a conversational prompt (the passage and the instruction)."""
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user") if isinstance(prompt, list) else prompt


def japanese(prompts: list, completions: list, **_) -> list[float]:
    return [japanese_ratio(text_of(c)) for c in completions]


def length_penalty(budget: int) -> Reward:
    def length(prompts: list, completions: list, completion_ids: list, **_) -> list[float]:
        return [max(0.0, min(1.0, 2.0 - len(ids) / budget)) for ids in completion_ids]
    return length


def reference(prompts: list, completions: list, reference: list[str], **_) -> list[float]:
    from ezoforge.eval.metrics import chrf

    _, scores = chrf([text_of(c) for c in completions], list(reference))
    return [s / 100 for s in scores]


class JudgeReward:
    """The recipe's judge as a reward: every completion graded `eval.judgments` times, the mean grade mapped from
    the rubric's scale to [0, 1]. Verdicts are cached in the stage's request cache (a resumed run asks only for
    what is missing); the judge's served names are kept for the stage's record."""

    __name__ = "judge"

    def __init__(self, ev: EvalConfig, cache: RequestCache, stack: ExitStack, load_local: Callable):
        from ezoforge.eval.judge_client import Judge
        from ezoforge.eval.tasks import TASK_TYPES

        self.ev = ev
        self.judge = Judge(ev, cache, stack, load_local)  # a remote judge's client (and its key) is made now
        self.rubric = TASK_TYPES["elyza100"]
        self.served: set[str] = set()
        self.unusable = 0
        self.lock = threading.Lock()

    def __call__(self, prompts: list, completions: list, instruction_id: list[str], **_) -> list[float | None]:
        from ezoforge.eval.items import OpenTask
        from ezoforge.eval.task_types.judged import Unit

        low, high = self.rubric.scale
        units = [Unit(OpenTask(f"reinforce/{i}", prompt_of(p), None, None), k, 1, j, (text_of(c),), self.rubric)
                 for k, (i, p, c) in enumerate(zip(instruction_id, prompts, completions))
                 for j in range(self.ev.judgments)]
        verdicts = self.judge.judge_all(units, "reinforce")
        failed = [v for v in verdicts if (v["error"] or "").startswith("judge request failed")]
        if failed:  # stop rather than train on missing rewards: a rerun resumes, the verdicts so far are cached
            raise EzoError(f"{len(failed)} of {len(verdicts)} judge requests failed (first: {failed[0]['error']}); "
                           "rerun the same command to resume from the last checkpoint")
        out: list[float | None] = []
        for k in range(len(completions)):
            mine = verdicts[k * self.ev.judgments:(k + 1) * self.ev.judgments]
            grades = [v["grade"] for v in mine]
            with self.lock:
                self.served.update(v["judge_served"] for v in mine if v["judge_served"])
                self.unusable += None in grades
            out.append(None if None in grades else (sum(grades) / len(grades) - low) / (high - low))
        return out


def user_function(spec: str) -> Callable:
    """The function `module:function` names; refused, naming the reward, when it does not import or is not one."""
    module, name = spec.split(":")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reinforce.rewards.{spec}: cannot import it ({e})") from None
    if not callable(function):
        raise ConfigError(f"reinforce.rewards.{spec}: not a function")
    return function


def user_reward(spec: str) -> Reward:
    """`module:function` as a reward named after the function."""
    function, name = user_function(spec), spec.split(":")[1]

    def reward(prompts: list, completions: list, **_) -> list[float]:
        return [float(function(prompt_of(p), text_of(c))) for p, c in zip(prompts, completions)]
    reward.__name__ = name
    return reward


def build(cfg: ReinforceConfig, ev: EvalConfig, stack: ExitStack, load_local: Callable, cache: RequestCache) -> tuple[list[Reward], list[float]]:
    """The recipe's rewards and their weights, in the recipe's order."""
    functions: list[Reward] = []
    for name in cfg.active:
        if name == "judge":  # the stage has checked the judge is set (reinforce.run)
            functions.append(JudgeReward(ev, cache, stack, load_local))
        elif name == "japanese":
            functions.append(japanese)
        elif name == "length":
            functions.append(length_penalty(cfg.length_budget))
        elif name == "reference":
            functions.append(reference)
        else:
            functions.append(user_reward(name))
    names = [f.__name__ for f in functions]
    if len(set(names)) < len(names):
        raise ConfigError(f"reinforce.rewards: two rewards share a name ({', '.join(names)}); rename a function")
    if taken := set(names) & RESERVED:
        raise ConfigError(f"reinforce.rewards: {', '.join(sorted(taken))} names a figure of the stage's own (the "
                          "weighted total, the completions' length); rename the function")
    return functions, list(cfg.active.values())
