"""What SFT (run.py) and DPO (dpo.py) share: the trainer's arguments, the adapter's atomic save, the run's summary
and what it ran on."""
from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from ezoforge.records import replace_folder


def trainer_args(cfg, staging: Path, device: torch.device, precision: torch.dtype | None = None,
                 cpu_autocast: bool = False) -> dict:
    """The arguments SFT, DPO and GRPO share (batch, schedule, saving, precision, Liger), from a section that has
    the training keys (TrainConfig, PreferConfig, ReinforceConfig); `precision` is the base's dtype, which CUDA autocast follows;
    `cpu_autocast`: a CPU run computes in bfloat16 (train.cpu_autocast, resolved)."""
    cuda = device.type == "cuda"
    if precision is None:
        precision = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    liger = cfg.liger if cfg.liger is not None else cuda and importlib.util.find_spec("liger_kernel") is not None
    return dict(
        output_dir=str(staging), per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate, weight_decay=0.0,
        lr_scheduler_type="cosine", warmup_steps=cfg.warmup_ratio,  # a float below 1 is a fraction of the steps
        max_steps=cfg.max_steps or -1, num_train_epochs=cfg.epochs or 1.0,
        logging_steps=cfg.log_every, save_strategy="steps", save_steps=cfg.save_every, save_total_limit=None,
        seed=cfg.seed, data_seed=cfg.seed, use_cpu=not cuda,
        bf16=(cuda and precision == torch.bfloat16) or (not cuda and cpu_autocast),
        fp16=cuda and precision == torch.float16,
        use_liger_kernel=bool(liger), include_num_input_tokens_seen="non_padding",
        disable_tqdm=True, log_level="warning", dataloader_num_workers=0,
        # FSDP set up on CPUs (use_fsdp_on_cpus): the trainer keeps that state instead of making its own
        **({"accelerator_config": {"use_configured_state": True}} if not cuda and fsdp_state_configured() else {}))


def fsdp_state_configured() -> bool:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    return AcceleratorState._shared_state.get("distributed_type") == DistributedType.FSDP


def save_adapter(trainer, out: Path, main: bool) -> None:
    """Write the adapter beside the old one and swap it in by renames: there is always a whole adapter on disk."""
    tmp = out / ".adapter.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    if trainer.is_fsdp_enabled:  # one adapter file, gathered from the shards
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(tmp))  # every rank takes part when the model is sharded
    if main:
        replace_folder(tmp, out / "adapter")


def fsdp_on_cpus_asked() -> bool:
    """Several processes on CPUs under `accelerate launch` with an FSDP config (or torchrun with
    ACCELERATE_USE_FSDP=true and the FSDP_* settings)."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available()
            and int(os.environ.get("WORLD_SIZE", "1")) > 1)


def use_fsdp_on_cpus(bf16: bool) -> None:
    """accelerate turns FSDP on for GPU process groups only: on CPUs the shared state is set to FSDP over gloo here,
    before anything else reads it (the trainer then keeps it: trainer_args' use_configured_state)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin

    PartialState(cpu=True).distributed_type = DistributedType.FSDP  # over the gloo process group it made
    plugin = FullyShardedDataParallelPlugin()  # its settings from the FSDP_* variables the launcher set
    state = AcceleratorState(mixed_precision="bf16" if bf16 else "no", cpu=True, fsdp_plugin=plugin,
                             dynamo_plugin=TorchDynamoPlugin(), _from_accelerator=True)
    state.fsdp_plugin = plugin


def distributed_setup(trainer) -> dict[str, Any]:
    """How the run was spread: processes, whether FSDP sharded the model, and the parameters this rank held against
    the whole model's."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    world = trainer.accelerator.num_processes
    wrapped = trainer.model_wrapped
    sharded = any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in wrapped.modules())
    # FSDP2 keeps each parameter as a DTensor over the ranks (its size the whole tensor's); FSDP1 as flat shards
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in wrapped.parameters())
    total = torch.tensor(local)
    if world > 1:
        torch.distributed.all_reduce(total)
    return {"world_size": world, "fsdp": sharded, "params_this_rank": local,
            "params_share": round(local / int(total), 4) if sharded else 1.0}


def hardware(device: torch.device) -> str:
    """What trained the model, for the model card."""
    if device.type == "cuda":
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(device)}"
    return f"CPU ({os.cpu_count()} cores)"


def kernels(model: torch.nn.Module) -> dict[str, Any]:
    """What computed the run, read off the trained model and this process rather than the settings: the attention
    implementation, whether the loss went through TRL's fused LM head, the modules Liger patched, the bitsandbytes
    4-bit layers, and the Triton kernels (TRL's and Liger's) that were compiled and launched."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    code = getattr(base.forward, "__code__", None)
    bnb = sys.modules.get("bitsandbytes")
    return {"attention": base.config._attn_implementation,
            # TRL replaces the model's forward with one that takes `fused_lm_head` (trl.trainer.utils.add_fused_lm_head)
            "fused_lm_head": code is not None and "fused_lm_head" in code.co_varnames,
            "liger_modules": sum((getattr(m.forward, "__module__", None) or "").startswith("liger_kernel")
                                 for m in base.modules()),
            "linear4bit_modules": sum(isinstance(m, bnb.nn.Linear4bit) for m in base.modules()) if bnb else 0,
            "triton_kernels": launched_triton_kernels(("trl", "liger_kernel"))}


def launched_triton_kernels(packages: tuple[str, ...]) -> list[str]:
    """The module-level Triton kernels of these packages that have a compiled binary in this process."""
    def launched(obj) -> bool:
        while type(obj).__module__.startswith("triton.runtime"):  # Autotuner and Heuristics wrap a JITFunction as .fn
            caches = getattr(obj, "device_caches", None)  # JITFunction: device -> (compiled kernels by key, ...)
            if caches is not None:
                return any(isinstance(c, (tuple, list)) and bool(c[0]) for c in caches.values())
            obj = getattr(obj, "fn", None)
        return False

    return sorted(f"{name}.{attr}" for name, module in list(sys.modules.items())
                  if module is not None and name.partition(".")[0] in packages
                  for attr, obj in list(vars(module).items()) if launched(obj))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [r for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    steady = steps[1:] or steps  # the first step carries warm-up
    return {"train_loss_first": steps[0]["loss"] if steps else None,
            "train_loss_last": steps[-1]["loss"] if steps else None,
            "eval_loss_start": rows[0]["eval_loss"] if rows and rows[0]["step"] == 0 else None,
            "eval_loss": evals[-1] if evals else None,
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in steady), 1) if steps else None,
            "step_s": round(statistics.median(r["step_s"] for r in steady), 3) if steps else None}
