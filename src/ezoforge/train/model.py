"""The base model for training: NF4 4-bit (QLoRA) where bitsandbytes works, full precision otherwise."""
from __future__ import annotations

import importlib.util
import logging

import torch

from ezoforge.config import TrainConfig
from ezoforge.errors import ModelError
from ezoforge.models import resolve

log = logging.getLogger(__name__)


def four_bit_problem(device: torch.device) -> str | None:
    """Why bitsandbytes 4-bit cannot train on this device, or None when a tiny NF4 layer passes gradients."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to(device)
        keep_cpu_weights_trainable(layer)
        x = torch.randn(4, 64, device=device, requires_grad=True)
        layer(x).float().square().sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all() or x.grad.abs().sum() == 0:
            return "4-bit layer gave no usable gradient"
    except Exception as e:  # bitsandbytes raises many kinds on unsupported platforms
        return f"{type(e).__name__}: {e}"
    return None


def keep_cpu_weights_trainable(model: torch.nn.Module) -> None:
    # bitsandbytes repacks 4-bit weights into a CPU inference layout on the first no-grad eval forward (AVX512-BF16
    # CPUs); LoRA gradients are silently wrong afterwards. Keep the trainable layout.
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def use_qlora(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.qlora is False:
        return False
    problem = four_bit_problem(device)
    if problem:
        log.warning("QLoRA is not available on %s (%s): training LoRA on a %s base instead", device, problem,
                    "bf16" if device.type == "cuda" else "float32")
        return False
    return True


def attn_implementation(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_base(spec: str, cfg: TrainConfig, device: torch.device, qlora: bool):
    """The base model, 4-bit NF4 (double-quantized, bf16 compute) when `qlora`; bf16 on CUDA, float32 on CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs: dict = {"dtype": dtype, "attn_implementation": attn_implementation(cfg, device)}
    if qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16)  # storage in bf16 lets FSDP shard the 4-bit weights
        if device.type == "cpu":
            kwargs["device_map"] = "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve(spec), **kwargs)
    except OSError as e:
        raise ModelError(f"{spec}: cannot load model ({e})") from None
    if qlora and device.type == "cpu":
        keep_cpu_weights_trainable(model)
    model.config.use_cache = False  # a cache would make the model ignore packed position ids
    return model


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, task_type="CAUSAL_LM")


def float32_adapters(model: torch.nn.Module) -> None:
    # TRL casts a 4-bit model's adapters to bf16; AdamW updates (~lr) then round away against bf16 weights.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
