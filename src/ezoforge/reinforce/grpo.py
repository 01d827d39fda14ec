"""GRPO (TRL's GRPOTrainer) continuing a LoRA adapter, with that adapter as the KL reference.

As in DPO (train/dpo.py), the base loads once with the starting adapter trainable as "default", and TRL copies it
into a frozen "ref" adapter beside it: the KL is to the SFT (or DPO) model, so it is 0 at the first step, never to
the bare base. Completions come from vLLM colocated with training on a GPU where it is installed (TRL's colocate
mode, `reinforce.engine`), from transformers otherwise. Checkpoints, kill/resume and the adapter swap are
`ezo train`'s (train/checkpoints.py, train/trainer.py).
"""
from __future__ import annotations

import importlib.util
import logging
import statistics
from pathlib import Path
from typing import Any

import torch

from ezoforge.errors import ConfigError
from ezoforge.reinforce.rewards import Reward
from ezoforge.reinforce.settings import ReinforceConfig
from ezoforge.train.dpo import REF
from ezoforge.train.model import use_cpu_autocast
from ezoforge.train.settings import TrainConfig
from ezoforge.train.trainer import trainer_args

log = logging.getLogger(__name__)


def use_vllm(cfg: ReinforceConfig, device: torch.device) -> bool:
    """Whether completions come from vLLM: stated, it must be able to run (a CUDA card, vLLM installed); auto, where
    it can (logged)."""
    installed = importlib.util.find_spec("vllm") is not None
    if cfg.engine == "vllm" and not (device.type == "cuda" and installed):
        raise ConfigError(f"reinforce.engine is vllm but vLLM needs a CUDA card and `pip install vllm` (device "
                          f"{device}, vLLM {'installed' if installed else 'not installed'})")
    chosen = cfg.uses_vllm(device.type, installed)
    if cfg.engine == "auto":
        log.info("reinforce.engine auto: completions from %s", "vLLM, colocated with training" if chosen else
                 "transformers" + ("" if device.type == "cuda" else " (the CPU)"))
    return chosen


def grpo_config(cfg: ReinforceConfig, train: TrainConfig, weights: list[float], staging: Path, device: torch.device,
                precision: torch.dtype, vllm: bool):
    from trl import GRPOConfig

    args = trainer_args(cfg, staging, device, precision, use_cpu_autocast(train, device))
    # A step is `batch_size` prompts with `num_generations` completions each (TRL counts completions).
    args.update(per_device_train_batch_size=cfg.batch_size * cfg.num_generations,
                per_device_eval_batch_size=cfg.batch_size * cfg.num_generations,
                include_num_input_tokens_seen="no")  # GRPO's batches are not input_ids rows
    return GRPOConfig(
        **args, eval_strategy="no", num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, beta=cfg.beta,
        reward_weights=weights, gradient_checkpointing=train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False, "every_n_layers": train.checkpoint_every},
        generation_kwargs={"use_cache": True},  # the training load turns the cache off (train/model.py)
        disable_dropout=True,  # dropout would make the policy differ from its reference at the same weights
        use_vllm=vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        report_to=[])


def make_trainer(model, tokenizer, rewards: list[Reward], weights: list[float], cfg: ReinforceConfig,
                 train: TrainConfig, rows: list[dict], staging: Path, device: torch.device, vllm: bool,
                 callbacks: list | None = None):
    from datasets import Dataset, disable_progress_bars
    from transformers import PrinterCallback
    from trl import GRPOTrainer

    from ezoforge.models import stop_token_ids
    from ezoforge.train.model import float32_adapters

    disable_progress_bars()  # the stage shows its own progress
    base = model.get_base_model()
    base.generation_config.eos_token_id = stop_token_ids(base, tokenizer)  # a reply ends at the end of its turn
    trainer = GRPOTrainer(model=model, reward_funcs=rewards,
                          args=grpo_config(cfg, train, weights, staging, device, base.dtype, vllm),
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    if cfg.beta and REF not in trainer.model.peft_config:
        raise RuntimeError("TRL made no frozen reference adapter: the KL would be to the base, not the SFT model")
    float32_adapters(trainer.model)
    return trainer


def reward_columns(names: list[str]):
    """GRPO's logged figures as metrics.jsonl columns: the weighted reward, each named reward's mean and spread
    (`reward_NAME_mean`, `reward_NAME_std`), the KL to the starting adapter and the completions' mean length."""
    def columns(logs: dict[str, float]) -> dict[str, Any]:
        row = {"reward": logs.get("reward"), "reward_std": logs.get("reward_std"), "kl": logs.get("kl"),
               "completion_tokens": logs.get("completions/mean_length")}
        for name in names:
            row[f"reward_{name}_mean"] = logs.get(f"rewards/{name}/mean")
            row[f"reward_{name}_std"] = logs.get(f"rewards/{name}/std")
        return {k: None if v is None else round(v, 5) for k, v in row.items()}
    return columns


def score(model, tokenizer, rows: list[dict], rewards: list[Reward], weights: list[float],
          cfg: ReinforceConfig) -> dict[str, Any] | None:
    """Each reward's mean, and the weighted total, over `num_generations` completions per prompt of `rows`,
    sampled by infer's Generator at the training temperature from a fixed seed: the policy's expected reward as it is
    now, so before and after compare the model alone."""
    if not rows:
        return None
    from ezoforge.infer.generate import Generator, Sampling
    from ezoforge.models import Loaded

    generator = Generator(Loaded(model, tokenizer, "policy", None, model.device, 0.0))
    rows = [r for r in rows for _ in range(cfg.num_generations)]
    sampling = Sampling(cfg.max_completion_length, cfg.temperature, 1.0, cfg.seed)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng():  # training's random state is left as it was
            # The training load turns the KV cache off (train/model.py); generation wants it.
            done = generator.complete_text([generator.prompt_text(r["prompt"]) for r in rows], sampling,
                                           use_cache=True)
    finally:
        model.train(was_training)
    completions = [[{"role": "assistant", "content": c.text}] for c in done]
    ids = [range(c.completion_tokens) for c in done]  # rewards read the completions' lengths only
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    figures: dict[str, Any] = {}
    total = 0.0
    for reward, weight in zip(rewards, weights):
        values = [v for v in reward([r["prompt"] for r in rows], completions, completion_ids=ids, **columns)
                  if v is not None]
        mean = statistics.fmean(values) if values else None
        figures[reward.__name__] = None if mean is None else round(mean, 4)
        total += weight * (mean or 0.0)
    figures["reward"] = round(total, 4)
    figures["completion_tokens"] = round(statistics.fmean(c.completion_tokens for c in done), 1)
    return figures


def plot_rewards(rows: list[dict[str, Any]], names: list[str], path: Path) -> None:
    """Each named reward's mean per step beside the weighted total: which reward moved."""
    from ezoforge.train.progress import plot_steps

    plot_steps(rows, [("reward", "weighted reward", {"linewidth": 2}), *[(f"reward_{n}_mean", n, {}) for n in names]],
               "reward (mean over the step's completions)", path)
