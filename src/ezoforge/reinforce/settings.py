"""The `reinforce:` section of a recipe: GRPO's settings and its named, weighted rewards."""
from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import Field, model_validator

from ezoforge.config import Operational, Recipe, Section

# The rewards reinforce knows by name; any other name is a user's function, `module:function`.
REWARDS = ("judge", "japanese", "length", "reference")


class ReinforceConfig(Section):
    """`ezo reinforce`: GRPO (TRL's GRPOTrainer) continuing the SFT adapter (DPO's where prefer ran), against that
    adapter as the KL reference, on synth's instructions, with named, weighted rewards."""

    # name -> weight: judge, japanese, length, reference, module:function. A weight of 0 turns a reward off (`--set`
    # merges into the recipe's rewards, so `--set reinforce.rewards.judge=0` drops the judge).
    rewards: dict[str, float] = {"judge": 1.0}
    limit: int | None = Field(None, ge=1)  # instructions drawn (seeded) from the pairs the SFT trained on
    held_out: int = Field(8, ge=0)  # of those, prompts never trained on: rewards scored before and after
    num_generations: int = Field(4, ge=2)  # completions per prompt, the group each reward is normalized in
    max_completion_length: int = Field(256, ge=4)
    length_budget: int = Field(200, ge=1)  # `length`: 1 up to this many completion tokens, 0 at twice as many
    temperature: float = Field(0.9, gt=0.0, le=2.0, allow_inf_nan=False)
    beta: float = Field(0.04, ge=0.0, allow_inf_nan=False)  # KL to the starting policy (the SFT/DPO adapter)
    learning_rate: float = Field(5e-6, gt=0.0)
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)
    max_steps: int = Field(100, ge=1)
    epochs: None = None  # GRPO runs by steps (trainer_args reads the field)
    batch_size: int = Field(2, ge=1)  # prompts per step, each with num_generations completions
    grad_accum: int = Field(1, ge=1)
    # Where completions come from on a GPU: vLLM colocated with training (TRL's colocate mode), or transformers;
    # auto: vLLM where it is installed (logged). The CPU generates with transformers.
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    # vLLM's share of the card beside training: where it runs, not what it samples (as vllm.gpu_memory_utilization)
    vllm_gpu_memory_utilization: Operational[float] = Field(0.3, gt=0.0, lt=1.0)
    seed: int = 0
    save_every: Operational[int] = Field(25, ge=1)
    keep_checkpoints: Operational[int] = Field(2, ge=1)
    log_every: Operational[int] = Field(1, ge=1)
    liger: bool | None = None

    @model_validator(mode="after")
    def _checks(self) -> "ReinforceConfig":
        if not self.active:
            raise ValueError("rewards: give at least one reward a weight (judge, japanese, length, reference, "
                             "module:function)")
        for name, weight in self.rewards.items():
            if name not in REWARDS and not re.fullmatch(r"[\w.]+:\w+", name):
                raise ValueError(f"rewards.{name}: not a known reward ({', '.join(REWARDS)}) nor a `module:function`")
            if not math.isfinite(weight):
                raise ValueError(f"rewards.{name}: the weight must be a finite number")
        return self

    def check_recipe(self, recipe: Recipe) -> None:
        if "judge" in self.active and not (recipe.eval.judge_url and recipe.eval.judge_model):
            raise ValueError("reinforce.rewards.judge grades completions with the recipe's judge: set eval.judge_url "
                             "and eval.judge_model, or drop that reward")

    def uses_vllm(self, device_type: str, installed: bool) -> bool:
        """Where completions come from: vLLM when stated, or under auto on CUDA where vLLM is `installed`.
        `grpo.use_vllm` decides it so here (and refuses a stated vLLM that cannot run), `ezo plan` on the planned
        card."""
        return self.engine == "vllm" or (self.engine == "auto" and device_type == "cuda" and installed)

    @property
    def active(self) -> dict[str, float]:
        """The rewards that count: those with a weight other than 0, in the recipe's order."""
        return {name: weight for name, weight in self.rewards.items() if weight != 0}
