"""The `prefer:` section of a recipe: DPO on answers the SFT model samples and the judge grades."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ezoforge.config import GenerationConfig, Operational, Recipe, Section


class SamplingConfig(GenerationConfig):
    """Generation that samples: several answers to one prompt must be able to differ."""

    temperature: float = Field(0.8, gt=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(0.95, gt=0.0, le=1.0, allow_inf_nan=False)


class PreferConfig(Section):
    """`ezo prefer`: preference pairs from the SFT model's own answers, graded by the recipe's judge (eval.judge_*),
    then DPO continuing the SFT adapter against the SFT model as the reference."""

    limit: int | None = Field(None, ge=1)  # instructions drawn (seeded, nested) from the pairs the SFT trained on
    samples: int = Field(4, ge=1)  # answers sampled per instruction from the SFT model
    include_reference: bool = True  # the synthesized response stands as one more candidate
    min_margin: float = Field(1.0, gt=0)  # keep (best, worst) only when their grades differ by at least this
    generation: SamplingConfig = SamplingConfig()
    seed: int = 0
    # DPO (TRL's DPOTrainer) on the kept pairs; the LoRA shape, quantization and attention are the SFT's (train.*).
    beta: float = Field(0.1, gt=0, allow_inf_nan=False)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                       "aot", "apo_zero", "apo_down", "sigmoid_norm"] = "sigmoid"
    learning_rate: float = Field(5e-5, gt=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(2, ge=1)  # pairs per step (each is two sequences)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=16)  # prompt + answer tokens; longer pairs are cut at the end
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # held-out pairs: DPO loss and log-prob margin before/after
    save_every: Operational[int] = Field(50, ge=1)
    keep_checkpoints: Operational[int] = Field(2, ge=1)
    log_every: Operational[int] = Field(1, ge=1)
    liger: bool | None = None  # None: Liger's layer kernels on CUDA when liger-kernel is installed


    @model_validator(mode="after")
    def _checks(self) -> "PreferConfig":
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set max_steps or epochs, not both")
        if self.samples == 1 and not self.include_reference:
            raise ValueError("one sampled answer and no reference make no pair: raise samples or include_reference")
        return self

    def check_recipe(self, recipe: Recipe) -> None:
        if not recipe.eval.judge_model:
            raise ValueError("stage prefer grades answers with the recipe's judge: set eval.judge_url and "
                             "eval.judge_model")
