"""The `train:` (SFT with LoRA or QLoRA) and `merge:` sections of a recipe."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ezoforge.config import Operational, Section

TrackerName = Literal["none", "tensorboard", "wandb", "mlflow"]


class TrainConfig(Section):
    # auto: 4-bit NF4 on CUDA where bitsandbytes trains, LoRA on a CPU (see train/model.py); true: 4-bit or an error.
    qlora: Literal["auto"] | bool = "auto"
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    learning_rate: float = Field(2e-4, gt=0.0)
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(2048, ge=16)
    packing: bool = True
    # Also learn each pair's source passage, as Instruction Pre-Training trains on the raw text with its pairs.
    # Off: plain SFT, loss on assistant tokens only (EZO's "plain instruction tuning").
    context_loss: bool = False
    # passage: the pairs synthesized from one passage train as one conversation (the passage and the first
    # instruction, then the other instructions as later turns), so the passage is read once, not once per pair;
    # a group longer than max_length is split into several conversations, each with the passage. none: one
    # conversation per pair. Pairs without a context train alone either way.
    group_pairs: Literal["passage", "none"] = "passage"
    # Checkpointing recomputes the same activations: it trades memory for time, never the result (operational).
    gradient_checkpointing: Operational[bool] = True
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    eval_every: int = Field(50, ge=1)  # held-out loss every N steps and after the last (what metrics.jsonl records)
    save_every: Operational[int] = Field(50, ge=1)
    keep_checkpoints: Operational[int] = Field(2, ge=1)
    log_every: Operational[int] = Field(1, ge=1)
    seed: int = 0
    target_modules: str | list[str] = "all-linear"
    liger: bool | None = None  # None: Liger kernels on CUDA when liger-kernel is installed
    # keep attention outputs, recompute the rest (with gradient_checkpointing)
    selective_checkpointing: Operational[bool] = False
    # checkpoint every n-th decoder layer: more speed for more memory
    checkpoint_every: Operational[int] = Field(1, ge=1)
    compile: bool = False  # torch.compile the model
    # Training on a CPU: matmuls in bfloat16 under autocast (weights, adapters and optimizer stay float32). auto: where
    # the CPU has bf16 instructions (AVX512-BF16, AMX), 1.5-1.8x faster steps on the bench CPU (logged); true: also
    # elsewhere (emulated, slower). A GPU run computes in the base's dtype.
    cpu_autocast: Literal["auto"] | bool = "auto"
    attn_implementation: str = "auto"  # auto: flash_attention_2 on CUDA when installed (padding-free), else sdpa
    # Each checkpointed layer's input waits in pinned host memory for its recompute (copies overlap compute).
    # auto: on CUDA when gradient_checkpointing is on; true: always (also on CPU, where it saves nothing); false: off.
    offload_activations: Operational[bool | Literal["auto"]] = "auto"

    # Experiment trackers the trainer logs to: none, tensorboard (event files in the train folder), wandb, mlflow.
    report_to: Operational[TrackerName | list[TrackerName]] = "none"

    def uses_qlora(self, device_type: str, problem: str | None = None) -> bool:
        """`train.qlora` resolved on a kind of device, where 4-bit training has `problem` (None: none): auto is 4-bit
        on CUDA where bitsandbytes trains. `train.model.use_qlora` decides it so here, `ezo plan` on the planned
        card."""
        return self.qlora is not False and (self.qlora is True or device_type == "cuda") and problem is None

    def offloads_activations(self, device_type: str) -> bool:
        """`train.offload_activations` resolved: auto is on where it frees accelerator memory (CUDA, checkpointing).
        `train.offload.wants_offload` decides it so here, `ezo plan` on the planned card."""
        if self.offload_activations != "auto":
            return self.offload_activations
        return device_type == "cuda" and self.gradient_checkpointing

    @model_validator(mode="after")
    def _one_length(self) -> "TrainConfig":
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set max_steps or epochs, not both")
        return self

    @model_validator(mode="after")
    def _offload_needs_checkpointing(self) -> "TrainConfig":
        if self.offload_activations is True and not self.gradient_checkpointing:
            raise ValueError("offload_activations: true needs gradient_checkpointing: true (it offloads the "
                             "checkpointed layers' inputs)")
        return self


class MergeConfig(Section):
    # The merged model's stored dtype; `auto` keeps the base's.
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "bfloat16"
