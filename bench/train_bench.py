"""Training step of `ezo train` against plain HF transformers + peft QLoRA, in the same run, on the same card.

Llama-3.1-8B shape, random weights built on the GPU, NF4 4-bit (double quant, bf16 compute), LoRA r=16 on all
linear layers, AdamW. Tokens/s and peak memory during the training steps (weights included, the bf16 build
transient excluded — measured the same way for both sides):
  8b    4 rows x 2,048 tokens: the baseline (HF + peft, gradient checkpointing, full fp32 logits) vs our step
        (TRL's chunked fused loss head), levers added one at a time: Liger kernels, offloaded checkpointing, then the
        sweep that picks the defaults around that: micro-batch (2 x 2 accumulated, 8), checkpoint_every (2, 4, with
        and without offload), selective checkpointing, no checkpointing; torch.compile last.
  mix   a realistic mix of Japanese chat lengths (bench/ja_chat_lengths.json: ELYZA-tasks-100, JSQuAD passages with
        questions, Japanese MT-Bench, counted with the real Llama 3 tokenizer and chat format), 4 rows a step:
        the baseline padding each batch vs our step padded vs packed padding-free to 2,048-token rows.
  70b   Llama-3.1-70B shape, QLoRA, 1 x 4,096 tokens, the baseline and ours on the same model; built layer by layer
        on the meta device and quantized as it goes, so the bf16 model never exists whole.
The ratio of our best 2,048-token step (within 0.7x the baseline's memory, if any is) to the baseline prints last,
after the 70B figures against their targets.

    python bench/train_bench.py [--only 8b,mix,70b] [--steps 6] [--no-sweep]   # on the GPU (PYTHONPATH=src)
    python bench/train_bench.py --tiny                             # 2-layer shapes on CPU: checks the script only
    python bench/train_bench.py --make-lengths ../shared/data      # rewrites bench/ja_chat_lengths.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

LENGTHS = Path(__file__).with_name("ja_chat_lengths.json")
SYSTEM = "あなたは誠実で優秀な日本人のアシスタントです。特に指示が無い場合は、原則日本語で回答してください。"
TARGETS = "8B 4x2048: tokens/s >= 1.5x at peak memory <= 0.7x the baseline; 70B 1x4096: peak <= 45 GiB, tokens/s >= the baseline"

p = argparse.ArgumentParser()
p.add_argument("--tiny", action="store_true")
p.add_argument("--only", default="8b,mix,70b")
p.add_argument("--steps", type=int, default=6, help="timed steps per variant (after 2 warm-up steps)")
p.add_argument("--no-sweep", action="store_true", help="8b: the lever ladder only, not the sweep around it")
p.add_argument("--out", default=os.environ.get("OUT"), help="folder for train_bench.json (default: $OUT, else none)")
p.add_argument("--make-lengths", metavar="SHARED_DATA")
args = p.parse_args()

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
cuda = dev.type == "cuda"
WARMUP = 2
results: list[dict] = []


def log(**kw):
    kw = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in kw.items()}
    results.append(kw)
    print(json.dumps(kw, ensure_ascii=False), flush=True)
    if args.out:  # after every figure: a run cut short by a time limit keeps what it measured
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "train_bench.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))


# ---------------------------------------------------------------- the Japanese length mix (made once, offline)

def make_lengths(shared: Path) -> None:
    """[total, trained] token counts of real Japanese chats in the Llama 3 chat format."""
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    fmt = ChatFormat(Tokenizer.get_instance())

    def count(turns: list[tuple[str, str]]) -> list[int]:
        total, trained = 1, 0  # <|begin_of_text|>
        for role, text in [("system", SYSTEM)] + turns:
            n = len(fmt.encode_message(RawMessage(role=role, content=text, stop_reason="end_of_turn"), None)[0])
            total += n
            trained += n - 4 if role == "assistant" else 0  # the header is prompt; content and <|eot_id|> train
        return [total, trained]

    chats = []
    for line in open(shared / "elyza-tasks-100" / "test.jsonl", encoding="utf-8"):
        row = json.loads(line)
        chats.append(count([("user", row["input"]), ("assistant", row["output"])]))
    questions = {q["question_id"]: q["turns"] for q in map(json.loads, open(
        shared / "ja-mt-bench" / "question_full.jsonl", encoding="utf-8"))}
    for line in open(shared / "ja-mt-bench" / "reference_answer" / "base-gpt4o-with-human-annotation.jsonl",
                     encoding="utf-8"):
        row = json.loads(line)
        turns = [t for q, a in zip(questions[row["question_id"]], row["choices"][0]["turns"])
                 for t in (("user", q), ("assistant", a))]
        chats.append(count(turns))
    squad = json.load(open(shared / "jglue" / "jsquad" / "valid-v1.3.json", encoding="utf-8"))
    paragraphs = [p for article in squad["data"] for p in article["paragraphs"]][:200]
    for para in paragraphs:  # a passage in the user turn, like our synth pairs with context
        qa = para["qas"][0]
        chats.append(count([("user", f"{para['context']}\n\n{qa['question']}"),
                            ("assistant", qa["answers"][0]["text"] + "です。")]))
    LENGTHS.write_text(json.dumps({"source": "ELYZA-tasks-100, ja-mt-bench (gpt-4o refs), JSQuAD valid (200)",
                                   "tokenizer": "llama_models llama3 tokenizer.model + ChatFormat",
                                   "system_prompt": SYSTEM, "lengths": chats}) + "\n")
    print(f"wrote {len(chats)} [total, trained] pairs to {LENGTHS}")


# ---------------------------------------------------------------- models

def shape(name: str):
    from transformers import LlamaConfig

    if args.tiny:
        cfg = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2 if name == "8b"
                          else 3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                          tie_word_embeddings=False)
    elif name == "8b":
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                          rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    else:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                          rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def to_nf4(block: nn.Module) -> None:
    """Replace a decoder layer's linear layers with NF4 ones, as `from_pretrained(quantization_config=...)` would
    (double quant, bf16 compute, bf16 storage like ezo train's loader)."""
    import bitsandbytes as bnb

    for parent in (block.self_attn, block.mlp):
        for name, lin in list(parent.named_children()):
            if isinstance(lin, nn.Linear):
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", quant_storage=torch.bfloat16,
                                      device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", quant_storage=torch.bfloat16).to(dev)
                setattr(parent, name, q)


def build(name: str):
    """Random weights, one decoder layer at a time on the device, each quantized before the next exists."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from ezoforge.train.model import keep_cpu_weights_trainable

    t0 = time.time()
    cfg = shape(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)

    def materialize(mod):
        mod.to_empty(device=dev)
        for m in mod.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            elif getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                nn.init.ones_(m.weight)

    for mod in (model.model.embed_tokens, model.model.norm, model.lm_head):
        materialize(mod)
    with torch.device(dev):
        model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    for layer in model.model.layers:
        materialize(layer)
        to_nf4(layer)
        gc.collect()
    if not cuda:
        keep_cpu_weights_trainable(model)
    model.config.use_cache = False
    log(bench="build", shape=name, seconds=time.time() - t0, gib=gib())
    return model


def gib() -> float:
    return torch.cuda.memory_allocated() / 2**30 if cuda else 0.0


def reset_peak() -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0


def sync() -> None:
    if cuda:
        torch.cuda.synchronize()


# ---------------------------------------------------------------- data

def chats(max_len: int) -> list[list[int]]:
    """[total, trained] pairs of the Japanese mix, cut to max_len, in a fixed shuffled order."""
    pairs = json.loads(LENGTHS.read_text())["lengths"]
    if args.tiny:
        pairs = [[max(8, t // 8), max(1, r // 8)] for t, r in pairs]
    pairs = [[min(t, max_len), min(r, min(t, max_len) - 1)] for t, r in pairs]
    random.Random(0).shuffle(pairs)
    return pairs


def example(total: int, trained: int, vocab: int, rng: random.Random) -> dict:
    ids = [rng.randrange(vocab - 1) for _ in range(total)]  # vocab - 1 is the pad id: never a real token
    labels = [-100] * (total - trained) + ids[total - trained:]
    labels[0] = -100
    return {"input_ids": ids, "labels": labels}


# ---------------------------------------------------------------- the two training steps

def baseline(model, batches: list[dict], variant: str) -> dict:
    """Plain HF transformers + peft: checkpointing, LoRA r=16 on the 7 linear kinds, AdamW, model(..., labels)."""
    from peft import LoraConfig, get_peft_model

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                  "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([q for q in peft_model.parameters() if q.requires_grad], lr=1e-4)
    reset_peak()
    times, tokens = [], []
    for i, batch in enumerate(batches[:WARMUP + args.steps]):
        batch = {k: v.to(dev) for k, v in batch.items()}
        sync()
        t = time.time()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = peft_model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= WARMUP:
            times.append(time.time() - t)
            tokens.append(int(batch["attention_mask"].sum()))
    result = dict(side="baseline", variant=variant, tokens_per_s=sum(tokens) / sum(times),
                  step_s=sum(times) / len(times), peak_gib=peak(), loss=loss.item())
    peft_model.unload()
    model.gradient_checkpointing_disable()
    model.disable_input_require_grads()
    del opt, peft_model
    return result


def padded(rows: list[dict], size: int, pad: int) -> list[dict]:
    """HF-style batches: `size` examples padded to the longest, with an attention mask."""
    out = []
    for i in range(0, len(rows) - size + 1, size):
        group = rows[i:i + size]
        width = max(len(r["input_ids"]) for r in group)
        ids = torch.full((size, width), pad)
        labels = torch.full((size, width), -100)
        mask = torch.zeros((size, width), dtype=torch.long)
        for j, r in enumerate(group):
            n = len(r["input_ids"])
            ids[j, :n], labels[j, :n], mask[j, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


def ours(model, rows: list[dict], variant: str, **levers) -> dict:
    """`ezo train`'s trainer (SFTTrainer, our packed rows and collator) on the same model, timed per optimizer step."""
    from transformers import TrainerCallback

    from ezoforge.train.run import make_trainer
    from ezoforge.train.settings import TrainConfig

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.tokens = [], []

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == WARMUP:
                reset_peak()
            sync()
            self.t, self.n = time.time(), state.num_input_tokens_seen

        def on_step_end(self, a, state, control, **kw):
            sync()
            if state.global_step > WARMUP:
                self.times.append(time.time() - self.t)
                self.tokens.append(state.num_input_tokens_seen - self.n)
            control.should_save = False

    cfg = TrainConfig(qlora=True, lora_r=16, lora_alpha=32, lora_dropout=0.0, learning_rate=1e-4, warmup_ratio=0.0,
                      max_steps=WARMUP + args.steps, batch_size=levers.pop("batch_size", 4),
                      grad_accum=levers.pop("grad_accum", 1), offload_activations=levers.get("offload", False),
                      max_length=levers.pop("max_length", 2048), eval_fraction=0.0, save_every=10**6,
                      liger=levers.get("liger", False) and cuda, compile=levers.get("compile", False) and cuda,
                      gradient_checkpointing=levers.get("checkpointing", True),
                      selective_checkpointing=levers.get("selective", False), checkpoint_every=levers.get("every", 1))
    if cfg.offload_activations and not cuda:
        variant += " (offload copies host to host: no CUDA)"
    timer = Timer()
    off = [k for k in ("liger", "compile") if levers.get(k) and not cuda]  # GPU-only levers
    variant += f" ({', '.join(off)} off: no CUDA)" if off else ""
    try:
        trainer = make_trainer(model, TOKENIZER, cfg, rows, [], Path(tempfile.mkdtemp()), dev, [timer])
        trainer.train()
        result = dict(side="ours", variant=variant, tokens_per_s=sum(timer.tokens) / sum(timer.times),
                      step_s=sum(timer.times) / len(timer.times), peak_gib=peak())
        trainer.model.unload()
    except Exception as e:  # a lever that fails here is reported, the others still run
        result = dict(side="ours", variant=variant, error=repr(e)[:400])
    model.gradient_checkpointing_disable()
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    return result


def pad_tokenizer(vocab: int):
    """The trainer only reads pad/eos ids from its tokenizer; the steps never encode or decode text."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<eos>": vocab - 2, "<pad>": vocab - 1}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


# ---------------------------------------------------------------- runs

def run_8b_and_mix(names: set[str]) -> None:
    from ezoforge.train.data import pack

    model = build("8b")
    vocab = model.config.vocab_size
    rng = random.Random(0)
    seq, rows_per_step = (256, 2) if args.tiny else (2048, 4)
    n = (WARMUP + args.steps) * rows_per_step * 2  # the sweep's largest micro-batch is twice the headline
    full = [example(seq, seq - 1, vocab, rng) for _ in range(n)]
    full_rows = [{**r, "seq_lengths": [seq]} for r in full]
    mix = [example(t, r, vocab, rng) for t, r in chats(seq)]
    if "8b" in names:
        log(**baseline(model, [{**b, "labels": b["input_ids"]} for b in padded(full, rows_per_step, vocab - 1)],
                       f"hf+peft qlora gc {rows_per_step}x{seq}"))
    if "mix" in names:
        log(**baseline(model, padded(mix, rows_per_step, vocab - 1), "hf+peft qlora gc, ja mix padded"))
    size = dict(batch_size=rows_per_step, max_length=seq)
    if "8b" in names:
        default = {"liger": True, "offload": True}  # what `ezo train` does on CUDA (auto values)
        ladder = [("ours gc", {}), ("+liger", {"liger": True}), ("+liger +offload", default)]
        half = rows_per_step // 2
        sweep = [(f"+liger +offload micro-batch {half} x 2 accumulated", {**default, "batch_size": half,
                                                                           "grad_accum": 2}),
                 (f"+liger +offload micro-batch {2 * rows_per_step}", {**default, "batch_size": 2 * rows_per_step}),
                 ("+liger +offload gc every 2nd layer", {**default, "every": 2}),
                 ("+liger +offload gc every 4th layer", {**default, "every": 4}),
                 ("+liger gc every 2nd layer", {"liger": True, "every": 2}),
                 ("+liger +offload +selective gc", {**default, "selective": True}),
                 ("+liger no gc", {"liger": True, "checkpointing": False})]
        for variant, levers in ladder + ([] if args.no_sweep else sweep):
            levers = {**size, **levers}
            rows = levers["batch_size"] * levers.get("grad_accum", 1)
            log(**ours(model, full_rows, f"{variant} {rows}x{seq}", **levers))
    if "mix" in names:
        best = {"liger": True, "selective": True}
        log(**ours(model, pack(mix, seq, packing=False), "+liger +selective, ja mix padded", **best, **size))
        packed = pack(mix, seq, packing=True)
        fill = sum(len(r["input_ids"]) for r in packed) / (len(packed) * seq)
        log(**ours(model, packed, f"+liger +selective, ja mix packed padding-free (fill {fill:.1%})",
                   **best, **size))
    if "8b" in names:  # last: compiling may leave the model in a state the other variants should not inherit
        log(**ours(model, full_rows, f"+liger +selective gc +compile {rows_per_step}x{seq}",
                   liger=True, selective=True, compile=True, **size))
    del model
    reset_peak()


def run_70b() -> None:
    model = build("70b")
    seq = 128 if args.tiny else 4096
    rng = random.Random(0)
    full = [example(seq, seq - 1, model.config.vocab_size, rng) for _ in range(WARMUP + args.steps)]
    rows = [{**r, "seq_lengths": [seq]} for r in full]
    log(**baseline(model, [{**b, "labels": b["input_ids"]} for b in padded(full, 1, model.config.vocab_size - 1)],
                   f"70b hf+peft qlora gc 1x{seq}"))
    one = dict(batch_size=1, max_length=seq, liger=True)
    log(**ours(model, rows, f"70b +liger +offload 1x{seq}", offload=True, **one))
    log(**ours(model, rows, f"70b +liger 1x{seq}", **one))
    del model
    reset_peak()


def summary() -> None:
    def side(name: str, shape: str) -> list[dict]:
        return [r for r in results if r.get("side") == name and "tokens_per_s" in r and "mix" not in r["variant"]
                and r["variant"].startswith("70b") == (shape == "70b")]

    for shape in ("70b", "8b"):
        base, mine = side("baseline", shape), side("ours", shape)
        if not base or not mine:
            continue
        base = base[0]
        limit = 45 if shape == "70b" else 0.7 * base["peak_gib"]  # GiB: the memory targets in TARGETS
        fitting = [r for r in mine if not cuda or r["peak_gib"] <= limit]
        best = max(fitting or mine, key=lambda r: r["tokens_per_s"])
        log(bench="ratio", shape=shape, best=best["variant"], within_memory_target=bool(fitting) if cuda else None,
            tokens_per_s_ratio=best["tokens_per_s"] / base["tokens_per_s"], peak_gib=best["peak_gib"],
            peak_memory_ratio=best["peak_gib"] / base["peak_gib"] if cuda else None, targets=TARGETS)


def main() -> None:
    import bitsandbytes
    import peft
    import transformers
    import trl

    global TOKENIZER
    log(bench="env", device=torch.cuda.get_device_name() if cuda else "cpu (--tiny checks the script only)",
        torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__, trl=trl.__version__,
        bitsandbytes=bitsandbytes.__version__,
        liger=__import__("importlib.metadata").metadata.version("liger-kernel") if _has("liger_kernel") else None)
    names = set(args.only.split(","))
    TOKENIZER = pad_tokenizer(shape("8b").vocab_size)
    if names & {"8b", "mix"}:
        run_8b_and_mix(names)
    if "70b" in names:
        run_70b()
    summary()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    if args.make_lengths:
        make_lengths(Path(args.make_lengths))
    else:
        main()
