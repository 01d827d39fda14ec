"""DPO (TRL's DPOTrainer) that continues an SFT LoRA adapter, with the SFT model itself as the reference.

The base loads once. The SFT adapter is loaded trainable as PEFT's "default" adapter and TRL copies it into a frozen
"ref" adapter beside it (TRL 1.x's replacement for `model_adapter_name`/`ref_adapter_name`): reference log-probs
are the same base with "ref" active, so no second copy of the base is held. DIR/adapter is the SFT adapter
updated, so merging it into the base gives SFT+DPO, not DPO alone.

Checkpoints, kill/resume and the adapter swap are `ezo train`'s (train/checkpoints.py, train/trainer.py).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ezoforge.stage import Stage
from ezoforge.train import checkpoints
from ezoforge.train.model import attn_implementation, float32_adapters, load_base, use_cpu_autocast
from ezoforge.train.progress import TrainLog, plot_loss
from ezoforge.train.settings import TrainConfig
from ezoforge.train.trainer import hardware, save_adapter, summarize, trainer_args

if TYPE_CHECKING:  # prefer declares its section; the DPO mechanics here only read it
    from ezoforge.prefer.settings import PreferConfig

log = logging.getLogger(__name__)

REF = "ref"  # the name TRL gives the frozen copy of the adapter it is handed


def dpo_config(cfg: PreferConfig, train: TrainConfig, staging: Path, device: torch.device, precision: torch.dtype):
    from trl import DPOConfig

    # TRL 1.16 computes DPO's log-probs through its own fused, chunked LM head (never the tokens x vocab logits) and
    # refuses Liger's fused loss; Liger adds its layer kernels only.
    return DPOConfig(
        **trainer_args(cfg, staging, device, precision, use_cpu_autocast(train, device)), eval_strategy="no",
        max_length=cfg.max_length,
        gradient_checkpointing=train.gradient_checkpointing,  # the names transformers < 5.23 knows (train/run.py)
        gradient_checkpointing_kwargs={"use_reentrant": False, "every_n_layers": train.checkpoint_every},
        beta=cfg.beta, loss_type=[cfg.loss_type], report_to=[])


def conversational(pairs: list[dict]) -> list[dict]:
    """Our pair rows as TRL's conversational preference rows (TRL applies the chat template)."""
    return [{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]


def load_policy(spec: str, sft_adapter: Path, train: TrainConfig, device: torch.device, qlora: bool, dtype: str):
    """The base with the SFT adapter as the trainable "default" adapter."""
    from peft import PeftModel

    base = load_base(spec, train, device, qlora, dtype)  # the Trainer moves it to the device
    return PeftModel.from_pretrained(base, str(sft_adapter), is_trainable=True)


def make_trainer(model, tokenizer, cfg: PreferConfig, train: TrainConfig, train_rows: list[dict],
                 eval_rows: list[dict], staging: Path, device: torch.device, callbacks: list | None = None):
    from datasets import Dataset, disable_progress_bars
    from transformers import PrinterCallback
    from trl import DPOTrainer

    disable_progress_bars()  # the stage shows its own progress
    base = model.get_base_model()
    trainer = DPOTrainer(
        model=model, args=dpo_config(cfg, train, staging, device, base.dtype),
        train_dataset=Dataset.from_list(conversational(train_rows)),
        eval_dataset=Dataset.from_list(conversational(eval_rows)) if eval_rows else None,
        processing_class=tokenizer, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    if REF not in trainer.model.peft_config:
        raise RuntimeError("TRL made no frozen reference adapter: the reference would be the base, not the SFT model")
    float32_adapters(trainer.model)  # only the trainable ("default") adapter: "ref" is frozen
    return trainer


def held_out(trainer) -> dict[str, float] | None:
    """DPO loss and the chosen-minus-rejected log-probability margin on the held-out pairs, as the model is now."""
    if trainer.eval_dataset is None:
        return None
    m = trainer.evaluate()
    return {"loss": round(m["eval_loss"], 5),
            "logp_margin": round(m["eval_logps/chosen"] - m["eval_logps/rejected"], 4),
            "reward_accuracy": round(m["eval_rewards/accuracies"], 4)}


def train_dpo(spec: str, dtype: str, sft_adapter: Path, tokenizer, cfg: PreferConfig, train: TrainConfig,
              pairs: list[dict], held: list[dict], out: Path, stage: Stage, device: torch.device,
              qlora: bool) -> dict[str, Any]:
    """Train DIR/adapter from `sft_adapter` on `pairs`, resuming from DIR/checkpoints; the DPO figures."""
    folder = out / "checkpoints"
    resume = checkpoints.latest(folder)
    resume_step = checkpoints.check(resume, stage) if resume else 0
    checkpoints.clean(folder)
    model = load_policy(spec, sft_adapter, train, device, qlora, dtype)
    train_log = TrainLog(out / "metrics.jsonl", resume_step)
    saver = checkpoints.AtomicCheckpoints(folder, stage, cfg.keep_checkpoints, len(pairs))
    trainer = make_trainer(model, tokenizer, cfg, train, pairs, held, folder / checkpoints.STAGING, device, [saver])
    log.info("DPO (%s, beta %g) on %d pairs (+%d held out), %s r=%d continuing %s on %s (%s attention)%s",
             cfg.loss_type, cfg.beta, len(pairs), len(held), "QLoRA" if qlora else "LoRA",
             model.peft_config["default"].r, sft_adapter, device, attn_implementation(train, device),
             f", resuming at step {resume_step}" if resume else "")
    if not resume:  # the SFT model's held-out loss is metrics.jsonl's step-0 row, written once
        trainer.add_callback(train_log)
    before = held_out(trainer)  # the checkpoint loads inside train(): here the model is the SFT model
    if resume:
        trainer.add_callback(train_log)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    after = held_out(trainer)
    trainer.model.delete_adapter(REF)  # the reference is the SFT adapter, kept in its own folder: save the policy only
    save_adapter(trainer, out, True)
    checkpoints.clean(folder)
    plot_loss(train_log.rows, out / "loss.png")
    s = summarize(train_log.rows)
    return {"dpo_steps": trainer.state.global_step, "dpo_loss_first": s["train_loss_first"],
            "dpo_loss_last": s["train_loss_last"], "dpo_step_s": s["step_s"], "held_out_pairs": len(held),
            "held_out_before": before, "held_out_after": after, "qlora": qlora, "device": str(device),
            "hardware": hardware(device), "resumed_from_step": resume_step}
