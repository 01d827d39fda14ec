"""`ezo train`: LoRA / QLoRA instruction tuning on TRL's SFTTrainer, resumable from atomic checkpoints.

DIR/adapter (PEFT), DIR/checkpoints/step-N, DIR/metrics.jsonl, DIR/loss.png, DIR/config.yaml, DIR/stats.json, DIR/DONE.
Rerunning the same command after a kill resumes from the newest complete checkpoint.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from pathlib import Path

import torch

from ezoforge.config import Recipe, output_settings
from ezoforge.errors import ConfigError
from ezoforge.models import check_model, load_tokenizer, pick_device, pin, pinned_revision, require_chat_template
from ezoforge.report_kit import fmt, plural, rate
from ezoforge.stage import Stage, done_info, input_files
from ezoforge.train import checkpoints
from ezoforge.train.data import PackedCollator, prepare
from ezoforge.train.model import (attn_implementation, float32_adapters, load_base, lora_config, name_base,
                                  require_stated_kernels, use_cpu_autocast, use_qlora)
from ezoforge.train.offload import OffloadCheckpoints, wants_offload
from ezoforge.train.progress import TrainLog, plot_loss
from ezoforge.train.settings import TrainConfig
from ezoforge.train.trainer import (distributed_setup, fsdp_on_cpus_asked, hardware, kernels, save_adapter, summarize,
                                    trainer_args, use_fsdp_on_cpus)

log = logging.getLogger(__name__)


def train_stage(recipe: Recipe, inputs: list[Path], out: Path) -> Stage:
    """The train folder: shaped by the train section, on the recipe's model, from these inputs. cpu_autocast is
    recorded resolved: a folder trained in float32 is not resumed in bfloat16 on another CPU. So is a hub base's
    revision (the commit it resolves to now): the run loads that one and no other."""
    autocast = use_cpu_autocast(recipe.train, pick_device(recipe.model.device))
    revision = pinned_revision(recipe.model.name)
    return Stage("train", out, {"train": {**output_settings(recipe.train), "cpu_autocast": autocast}},
                 model={**output_settings(recipe.model), **({"revision": revision} if revision else {})}, inputs=inputs)


def sft_config(cfg: TrainConfig, staging: Path, device: torch.device, evaluate: bool, eval_first: bool = False,
               precision: torch.dtype | None = None):
    from trl import SFTConfig

    return SFTConfig(
        **trainer_args(cfg, staging, device, precision, use_cpu_autocast(cfg, device)), max_length=cfg.max_length,
        eval_strategy="steps" if evaluate else "no", eval_steps=cfg.eval_every,
        eval_on_start=evaluate and eval_first,
        # The names transformers < 5.23 takes (5.23 renamed them activation_checkpointing*): see pyproject.toml.
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False, "every_n_layers": cfg.checkpoint_every,
                                       **({"selective": True} if cfg.selective_checkpointing else {})},
        torch_compile=cfg.compile,
        # Our rows are tokenized, labelled and packed already (see data.py).
        dataset_kwargs={"skip_prepare_dataset": True}, packing=False, report_to=trainer_trackers(cfg))


# ---------------------------------------------------------------- experiment tracking

TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def trackers(cfg: TrainConfig) -> list[str]:
    names = [cfg.report_to] if isinstance(cfg.report_to, str) else list(cfg.report_to)
    return [n for n in names if n != "none"]


def check_trackers(cfg: TrainConfig) -> None:
    """A tracker the recipe names must be installed: fail before the model loads, not after the first step."""
    for name in trackers(cfg):
        if not any(importlib.util.find_spec(m) for m in TRACKER_MODULES[name]):
            raise ConfigError(f"train.report_to: {name} is not installed (pip install {TRACKER_MODULES[name][0]})")


def trainer_trackers(cfg: TrainConfig) -> list[str]:
    # TensorBoard goes through our own callback (tensorboard_callback), which writes into the train folder
    # rather than under the trainer's staging dir, which is deleted after training.
    return [n for n in trackers(cfg) if n != "tensorboard"]


def tensorboard_callback(cfg: TrainConfig, out: Path) -> list:
    if "tensorboard" not in trackers(cfg):
        return []
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(out / "tensorboard")  # its writer opens there when training begins
    return [callback]


def make_trainer(model, tokenizer, cfg: TrainConfig, train_rows: list[dict], eval_rows: list[dict],
                 staging: Path, device: torch.device, callbacks: list | None = None, eval_first: bool = False):
    """The SFTTrainer for a loaded base model: LoRA on top, our packed rows and collator; `eval_first` measures
    the untrained model's eval loss before step 1."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTTrainer

    flat = model.config._attn_implementation.startswith("flash")  # varlen kernels want one padding-free row
    trainer = SFTTrainer(
        model=model, args=sft_config(cfg, staging, device, bool(eval_rows), eval_first, model.dtype),
        train_dataset=Dataset.from_list(train_rows), eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer, data_collator=PackedCollator(tokenizer.pad_token_id, flat),
        peft_config=lora_config(cfg, model), callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # the rich bar shows progress
    if not trainer.is_fsdp_enabled:  # FSDP flattens each unit into one dtype; its bf16 policy computes in bf16 anyway
        float32_adapters(trainer.model)
    # Offloaded checkpointing: installed when train() has turned checkpointing on.
    if wants_offload(cfg, device):
        trainer.add_callback(OffloadCheckpoints(device))
    # The loss never builds the (tokens x vocab) logits: TRL's SFTTrainer (>= 1.16) scores every batch through its
    # fused, chunked LM head (Triton tiles on CUDA); Liger adds its layer kernels only (TRL refuses Liger's fused
    # linear cross-entropy). tests/test_train_memory.py holds it to the plain loss and checks the allocations.
    return trainer


def run(recipe: Recipe, inputs: list[Path], out: Path, force: bool = False) -> dict:
    from accelerate import PartialState

    inputs, out = [Path(p) for p in inputs], Path(out)
    input_files(inputs)  # a missing or unfinished input fails before the output folder is claimed
    check_trackers(recipe.train)
    if fsdp_on_cpus_asked():  # the state's precision is fixed when it is made: cpu_autocast is resolved first
        autocast = use_cpu_autocast(recipe.train, torch.device("cpu"))
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"cpu_autocast": autocast})})
        use_fsdp_on_cpus(autocast)
    dist = PartialState()  # under `accelerate launch`, also binds this process to its GPU
    device = pick_device(recipe.model.device)
    check_model(recipe.model.name, None, recipe.model.device, recipe.model.chat_template)
    require_stated_kernels(recipe.train, device)
    qlora = use_qlora(recipe.train, device)  # stated-but-impossible 4-bit fails here, before any load
    train = recipe.train.model_copy(update={"cpu_autocast": use_cpu_autocast(recipe.train, device)})
    recipe = recipe.model_copy(update={"train": train})
    stage = train_stage(recipe, inputs, out)
    finished = stage.start(force) if dist.is_main_process else None
    dist.wait_for_everyone()
    if not dist.is_main_process and (done := stage.done()) is not None and done.fingerprint == stage.fingerprint:
        finished = done.stats
    if finished is not None:
        log.info("%s is already trained with these settings", out)
        return finished

    with stage.claimed() if dist.is_main_process else contextlib.nullcontext():
        return _train(recipe, inputs, out, stage, device, qlora, dist)


def _train(recipe: Recipe, inputs: list[Path], out: Path, stage: Stage, device: torch.device, qlora: bool,
           dist) -> dict:
    start = time.perf_counter()
    cfg, name = recipe.train, pin(recipe.model.name, stage.settings["model"].get("revision"))
    folder = out / "checkpoints"
    resume = checkpoints.latest(folder)
    resume_step = checkpoints.check(resume, stage) if resume else 0
    if dist.is_main_process:
        checkpoints.clean(folder)

    tokenizer = load_tokenizer(name, recipe.model.chat_template)
    require_chat_template(tokenizer, name)
    data = prepare(tokenizer, inputs, recipe.model.system_prompt, cfg.max_length, cfg.packing,
                   cfg.eval_fraction, cfg.seed, cfg.context_loss, cfg.group_pairs)
    s = data.stats  # also carries packing_efficiency into the run's stats
    log.info("%d pairs in %d examples (+%d held out) of %d tokens (%d as one example per pair) in %d rows of up to "
             "%d tokens, packing efficiency %.1f%%%s", s["pairs"], s["examples"], s["eval_examples"], s["train_tokens"],
             s["train_tokens_ungrouped"], s["rows"], cfg.max_length, 100 * s["packing_efficiency"],
             f", {s['truncated']} truncated" if s["truncated"] else "")
    model = load_base(name, cfg, device, qlora, recipe.model.dtype)
    train_log = TrainLog(out / "metrics.jsonl", resume_step, dist.is_main_process)
    saver = checkpoints.AtomicCheckpoints(folder, stage, cfg.keep_checkpoints, len(data.train))
    trainer = make_trainer(model, tokenizer, cfg, data.train, data.eval, folder / checkpoints.STAGING, device,
                           [train_log, saver, *tensorboard_callback(cfg, out)], eval_first=not resume)
    name_base(trainer.model, name)
    offload = any(isinstance(c, OffloadCheckpoints) for c in trainer.callback_handler.callbacks)
    log.info("training %s r=%d on %s (%s attention%s)%s", "QLoRA (NF4 4-bit base)" if qlora else "LoRA", cfg.lora_r,
             device, attn_implementation(cfg, device), ", checkpoint inputs offloaded to host memory" if offload else "",
             f", resuming at step {resume_step}" if resume else "")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if data.eval and trainer.state.global_step % cfg.eval_every:
        trainer.evaluate()  # the held-out loss of the adapter that is saved, whatever the cadence
    setup = distributed_setup(trainer)  # every rank takes part in the sum
    save_adapter(trainer, out, dist.is_main_process)
    if not dist.is_main_process:
        return {}
    checkpoints.clean(folder)

    plot_loss(train_log.rows, out / "loss.png")
    return stage.finish({"steps": trainer.state.global_step, **summarize(train_log.rows), "qlora": qlora,
                         "offload_activations": offload, "kernels": kernels(trainer.model),
                         "device": str(device), "hardware": hardware(device), "resumed_from_step": resume_step,
                         "seconds": round(time.perf_counter() - start, 1), "distributed": setup, **data.stats})


def summary(folder: Path) -> str:
    """The stage in one sentence, from its finished folder: what `ezo train` prints and the run report shows."""
    t = done_info(folder).stats
    return (f"{plural(t.get('steps'), 'step')} of {'QLoRA' if t.get('qlora') else 'LoRA'}, loss "
            f"{fmt(t.get('train_loss_first'))} → {fmt(t.get('train_loss_last'))}, held-out loss "
            f"{fmt(t.get('eval_loss'))}, {rate(t.get('tokens_per_s'))}")
