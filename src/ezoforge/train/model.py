"""The base model for training: NF4 4-bit (QLoRA) where bitsandbytes works, full precision otherwise."""
from __future__ import annotations

import importlib.util
import logging

import torch

from ezoforge.errors import ConfigError, ModelError
from ezoforge.models import pick_dtype, resolve, split_revision
from ezoforge.train.settings import TrainConfig

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


# bench/qlora_cpu_bench.py on the 2-core CPU of bench/RESULTS.md: seconds per step of QLoRA / LoRA, SmolLM2-135M.
CPU_QLORA_SLOWDOWN = "about 11x"


def use_qlora(cfg: TrainConfig, device: torch.device) -> bool:
    """`train.qlora`: false = LoRA; true = 4-bit NF4 or a ConfigError, raised before any model loads; auto = 4-bit
    on CUDA where bitsandbytes trains, LoRA on a CPU (logged). A failure while loading or training is never turned
    into a fallback."""
    if cfg.qlora is False:
        return False
    if not cfg.uses_qlora(device.type):
        log.info("train.qlora=auto: LoRA on a float32 base, since on a CPU 4-bit saves nothing a small model needs "
                 "and each step took %s as long (bench/qlora_cpu_bench.py); set train.qlora=true to insist",
                 CPU_QLORA_SLOWDOWN)
        return False
    problem = four_bit_problem(device)
    if cfg.uses_qlora(device.type, problem):
        return True
    if cfg.qlora is True:
        raise ConfigError(f"train.qlora is true but 4-bit NF4 cannot train on {device}: {problem} "
                          "(set train.qlora to auto or false, or pass --no-qlora, for LoRA)")
    log.warning("train.qlora=auto: bitsandbytes 4-bit cannot train on %s (%s): LoRA on a bf16 base", device, problem)
    return False


def use_cpu_autocast(cfg: TrainConfig, device: torch.device) -> bool:
    """`train.cpu_autocast` resolved: whether a CPU run computes in bfloat16 under autocast; a stated true on
    another device is a ConfigError, raised before any model loads."""
    if device.type != "cpu":
        if cfg.cpu_autocast is True:
            raise ConfigError(f"train.cpu_autocast is true but this run trains on {device}, not a CPU (a GPU run "
                              "computes in the base's dtype; set it to auto or false)")
        return False
    if cfg.cpu_autocast != "auto":
        return cfg.cpu_autocast
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    log.info("train.cpu_autocast=auto: %s", "matmuls in bfloat16 (this CPU has bf16 instructions; float32 weights "
             "and adapters)" if native else "float32 throughout (this CPU has no bf16 instructions)")
    return native


def require_liger(liger: bool | None, section: str, device: torch.device) -> None:
    """`SECTION.liger: true` must be usable (train, prefer, reinforce): checked before any model loads."""
    if liger is True and (device.type != "cuda" or importlib.util.find_spec("liger_kernel") is None):
        raise ConfigError(f"{section}.liger is true but Liger kernels need CUDA and `pip install liger-kernel` "
                          f"(device {device}, liger-kernel {'missing' if importlib.util.find_spec('liger_kernel') is None else 'installed'})")


def require_stated_kernels(cfg: TrainConfig, device: torch.device) -> None:
    """Kernels the recipe asks for by name must be usable: checked before any model loads."""
    require_liger(cfg.liger, "train", device)
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("train.attn_implementation is flash_attention_2 but flash-attn is not installed")


def attn_implementation(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_base(spec: str, cfg: TrainConfig, device: torch.device, qlora: bool, dtype: str = "auto"):
    """The base model in `model.dtype` (auto: bf16 on CUDA, float32 on CPU), or 4-bit NF4 (double-quantized)
    computing in that dtype (auto: bf16) when `qlora`."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    weights = pick_dtype(dtype, device)
    kwargs: dict = {"dtype": weights, "attn_implementation": attn_implementation(cfg, device)}
    if qlora:
        compute = torch.bfloat16 if dtype == "auto" else weights
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=compute)  # storage in the compute dtype lets FSDP shard the 4-bit weights
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


def lora_targets(cfg: TrainConfig, model) -> str | list[str]:
    """`train.target_modules`; `all-linear` on a multimodal checkpoint (Gemma 3 from 4B up) means the language
    model's linear layers, as peft would otherwise put adapters on the vision tower that text never trains."""
    if cfg.target_modules != "all-linear" or not any(n.endswith("vision_tower") for n, _ in model.named_modules()):
        return cfg.target_modules
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if ".language_model." in f".{n}" and isinstance(m, torch.nn.Linear)}
    return rf".*language_model\..*\.({'|'.join(sorted(names))})"


def lora_config(cfg: TrainConfig, model):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_targets(cfg, model), task_type="CAUSAL_LM")


def name_base(model, spec: str) -> None:
    """The adapter names its base as the hub knows it, at the revision it was trained on (`models.adapter_base` loads
    that one again): a pinned hub base loads from its snapshot folder, whose path peft would record instead."""
    repo, revision = split_revision(spec)
    if revision is not None:
        for cfg in model.peft_config.values():
            cfg.base_model_name_or_path, cfg.revision = repo, revision


def float32_adapters(model: torch.nn.Module) -> None:
    # TRL casts a 4-bit model's adapters to bf16; AdamW updates (~lr) then round away against bf16 weights.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
