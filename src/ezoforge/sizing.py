"""The memory and speed model that `ezo plan` and whoever it asks for an estimate share: a card's figures, a model's
shape, bytes per weight under each scheme, decoding and prefill rates, and what an answering engine is asked
(`EngineJob`) and answers (`EngineEstimate`). A backend estimates itself from these (`infer.backends.Backend.
estimate`), so `ezo plan` plans a new backend by what its class says."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ezoforge.models import bytes_per_param

GIB = 2**30


@dataclass(frozen=True)
class Card:
    memory_gib: float
    bf16_tflops: float  # dense peak
    bandwidth_tbs: float


@dataclass(frozen=True)
class Shape:
    params: float
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_heads: int
    heads: int
    context: int  # tokens the model takes (max_position_embeddings)
    tied: bool = False
    head_dim: int = 0  # 0: hidden / heads; Qwen3's small models and Gemma 3 set their own

    @property
    def head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def linear_dims(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer in one decoder block (q, k, v, o, gate, up, down)."""
        q, kv = self.heads * self.head, self.kv_heads * self.head
        h, i = self.hidden, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def embedding_params(self) -> int:
        """The input embeddings and the LM head: no quantization scheme here touches them (they stay 16-bit)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def kv_bytes_per_token(self) -> int:
        """The KV cache of one token in 16-bit: keys and values of every layer's KV heads."""
        return 2 * self.layers * self.kv_heads * self.head * 2


KNOWN_SHAPES = {  # so a plan works offline for the recipes we ship
    "llama-3.1-8b": Shape(8.03e9, 32, 4096, 14336, 128256, 8, 32, 131072),
    "llama-3.1-70b": Shape(70.6e9, 80, 8192, 28672, 128256, 8, 64, 131072),
    # Instruction Pre-Training's synthesizer: a Mistral-7B-v0.1 fine-tune
    "instruction-synthesizer": Shape(7.24e9, 32, 4096, 14336, 32000, 8, 32, 32768),
    "qwen3-8b": Shape(8.19e9, 36, 4096, 12288, 151936, 8, 32, 40960, head_dim=128),
}
# Training FLOPs per token: forward + backward through the frozen weights (input grads) + the recompute that
# gradient checkpointing adds = ~8 N. HF+peft QLoRA on one H100 reached 38% of peak at 8B (5,851 tok/s).
TRAIN_FLOPS_PER_PARAM = 8
TRAIN_MFU = 0.38
CHARS_PER_TOKEN_JA = 1.1  # Llama 3 tokenizer on Japanese prose (measured on the demo corpus: ~1.0–1.2)
DOC_TOKENS = 1500  # a curated document
# Prompt tokens around a passage: our prompted instruction with its few-shot example; the synthesizer's markers.
PROMPT_TOKENS = {"prompted": 600, "synthesizer": 10}
# Pairs one synthesizer answer holds (Instruction Pre-Training: ~200M pairs from ~40M raw texts).
SYNTHESIZER_PAIRS = 5
EVAL_PROMPT_TOKENS = 512  # an ELYZA-tasks-100 task with the system prompt, rounded up
# Chat-template tokens around each message: Llama 3's <|start_header_id|>ROLE<|end_header_id|>\n\n and <|eot_id|>.
TEMPLATE_TOKENS = 5
COMPRESSION = 2.5  # Parquet / gzip on Japanese text
DISK_BYTES_S = 1e9  # reading and writing weights (an NVMe-class disk)
DECODE_EFFICIENCY = 0.5  # share of the memory-bandwidth bound a batched decode reaches
PREFILL_MFU = 0.4  # share of the bf16 peak a prefill (and a compute-bound decode) reaches
# Bytes per weight of the quantized linear layers (embeddings and the LM head stay 16-bit): bitsandbytes NF4
# (vLLM's "bitsandbytes" too) and int8 as models.py counts them, FP8 with per-tensor scales, AWQ/GPTQ 4-bit with
# 16-bit scales and zeros per group of 128.
LINEAR_BYTES = {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0, "nf4": bytes_per_param("nf4"),
                "bitsandbytes": bytes_per_param("nf4"), "int8": bytes_per_param("int8"), "fp8": 1.0,
                "awq": 0.5 + 4 / 128, "gptq": 0.5 + 4 / 128}
# Bytes moved per parameter in a bitsandbytes batch decode step: the packed weight read, the 16-bit copy written
# and read back.
DEQUANT_TRAFFIC = {"nf4": 0.5 + 2 * 2, "int8": 1 + 2 * 2}
CUDA_OVERHEAD_GIB = 2.0  # CUDA context, allocator slack and a forward pass's activations (torch processes)
VLLM_OVERHEAD_GIB = 2.0  # vLLM: CUDA context and its profiling pass's activations
VLLM_GRAPHS_GIB = 1.0  # vLLM's captured CUDA graphs (none with enforce_eager)
PROCESS_RAM_GIB = 2.0  # a Python process with torch and transformers imported
VLLM_RAM_GIB = 4.0  # vLLM's processes on the host
HUB_SHARD_BYTES = 5e9  # the hub's usual safetensors shard (Llama-3.1-70B: 30 shards of ≤ 5 GB)


def known_shape(spec: str) -> str | None:
    key = spec.lower().replace("meta-llama-", "llama-").replace("_", "-")
    return next((name for name in KNOWN_SHAPES if name in key), None)


def model_shape(spec: str) -> Shape:
    if known_shape(spec):
        return KNOWN_SHAPES[known_shape(spec)]
    from transformers import AutoConfig

    from ezoforge.models import config_context_length, resolve

    cfg = AutoConfig.from_pretrained(resolve(spec)).get_text_config()  # a multimodal checkpoint's language model
    h, i, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    shape = Shape(0, n, h, i, v, kv, cfg.num_attention_heads, config_context_length(cfg), tied,
                  getattr(cfg, "head_dim", None) or 0)
    return replace(shape, params=sum(a * b for a, b in shape.linear_dims) * n + shape.embedding_params)


def weight_bytes(shape: Shape, scheme: str) -> float:
    return (shape.params - shape.embedding_params) * LINEAR_BYTES[scheme] + shape.embedding_params * 2


def largest_shard(spec: str, shape: Shape) -> tuple[float, str]:
    """Bytes of the model's largest weights file: measured for a local folder, else the hub's usual shard."""
    if spec.startswith("bundled:") or spec.endswith(".gguf"):
        from ezoforge.models import resolve

        spec = resolve(spec)  # the converted safetensors folder
    path = Path(spec).expanduser()
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if files:
        return float(max(f.stat().st_size for f in files)), "its largest file"
    return min(HUB_SHARD_BYTES, shape.params * 2), "the hub's usual shard size"


def decode_tokens_per_s(card: Card, shape: Shape, weights: float, batch: float, cards: int = 1) -> float:
    """Batched decoding: memory-bandwidth bound (the weights, split over `cards`, read once per step), capped by
    compute."""
    bandwidth = batch * cards * card.bandwidth_tbs * 1e12 * DECODE_EFFICIENCY / weights
    return min(bandwidth, cards * prefill_tokens_per_s(card, shape))


def prefill_tokens_per_s(card: Card, shape: Shape) -> float:
    return card.bf16_tflops * 1e12 * PREFILL_MFU / (2 * shape.params)


@dataclass(frozen=True)
class EngineJob:
    """What a stage asks of the engine that answers its requests, as `ezo plan` sees it."""

    card: Card
    shape: Shape | None  # None: a served model, whose shape is its server's
    spec: str  # the model answering
    dtype: str  # the 16-bit dtype of its unquantized weights on the card
    context: int  # the context the engine is given
    seq_tokens: float  # one request: its prompt and its answer
    batch: int  # requests decoded together (generation.batch_size)
    weights: float  # bytes of the stage's own load of the model (an in-process engine answers with it)
    traffic: float  # bytes one decode step reads of those weights (a dequantizing scheme reads more)
    shard: float  # bytes of the model's largest weights file (host memory while loading)


@dataclass(frozen=True)
class EngineEstimate:
    """An answering engine's share of a stage: GPU and host memory, disk it writes, its decoding rate (None: not
    planned, a server's or a CPU's) and the sentence that says where the figures come from."""

    source: str
    gpu_gib: float = 0.0
    ram_gib: float = PROCESS_RAM_GIB
    disk_bytes: float = 0.0
    tokens_per_s: float | None = None
    cards: int = 1  # cards one engine spans (tensor parallel)
    fits_gpu: bool | None = None  # None: it fits when gpu_gib fits the card


def in_process_gib(job: EngineJob) -> float:
    """A torch model in the stage's process on the card: its weights, the KV cache of a batch, CUDA's overhead."""
    return (job.weights + job.batch * job.seq_tokens * job.shape.kv_bytes_per_token) / GIB + CUDA_OVERHEAD_GIB


def in_process_words(job: EngineJob) -> str:
    """`in_process_gib` in words."""
    return (f"{job.weights / GIB:.1f} GiB of weights + KV cache of generation.batch_size {job.batch} x "
            f"{job.seq_tokens:,.0f} tokens + {CUDA_OVERHEAD_GIB:g} GiB")
