"""Shared pieces of the train/merge tests: a 2-layer Llama with the bundled SmolLM2 tokenizer, and the ELYZA rows."""
import json
from pathlib import Path

import pytest
import torch

from conftest import BUNDLED
from ezoforge.config import bundled_data
from ezoforge.models import resolve
from ezoforge.train import merge


def make_tiny_llama(out, context: int = 2048, dtype: torch.dtype = torch.float32, shard: str | None = None) -> str:
    """A randomly initialised 2-layer Llama that speaks the bundled tokenizer and its chat template, saved in `dtype`
    (in shards of at most `shard` when given)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ezoforge.models import load_tokenizer

    tok = load_tokenizer(BUNDLED)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(dtype).save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def assert_packed_rows_stay_apart(model, batch: dict, layout: list[list[int]], atol: float) -> None:
    """Each example of a packed batch (`layout`: the example lengths of each row) gets the logits it gets alone, where
    the same rows read as plain causal rows (no positions) let later examples see earlier ones."""
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        joined = model(input_ids=batch["input_ids"], use_cache=False).logits
        for b, lengths in enumerate(layout):
            offset = 0
            for n in lengths:
                alone = model(input_ids=batch["input_ids"][b:b + 1, offset:offset + n], use_cache=False).logits[0]
                own = (packed[b, offset:offset + n] - alone).abs().max().item()
                assert own < atol, (b, offset, own)
                if offset:
                    assert (joined[b, offset:offset + n] - alone).abs().max().item() > max(100 * own, 1e-3)
                offset += n


@pytest.fixture(scope="session")
def elyza_rows(tmp_path_factory):
    """The package's own ELYZA-format demo tasks as instruction/response rows (input→instruction,
    output→response): 14 rows, so training tests run on any clone."""
    path = tmp_path_factory.mktemp("elyza") / "elyza.jsonl"
    with open(bundled_data("bundled:tasks/demo-tasks.jsonl"), encoding="utf-8") as src, \
            open(path, "w", encoding="utf-8") as dst:
        for line in src:
            row = json.loads(line)
            dst.write(json.dumps({"instruction": row["input"], "response": row["output"]}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def passage_pairs(tmp_path_factory):
    """A synth folder as synth writes it, from the package's demo web text: the first documents over 900 tokens split
    into passages of at most 600 (synth's own split, so a document gives several), five pairs per passage that ask
    for and answer its k-th sentence (as scripted_judge's synthesizer does), in synth's order and ids; then two
    pairs without a passage."""
    from ezoforge.models import load_tokenizer
    from ezoforge.records import read_rows, write_parquet
    from ezoforge.stage import Stage
    from ezoforge.synth.passages import sentences, split

    tok = load_tokenizer(BUNDLED)

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    docs = [doc for _, doc in read_rows(bundled_data("bundled:web/fineweb-demo.parquet")) if count(doc["text"]) > 900]
    rows = []
    for doc in docs[:4]:
        for p, passage in enumerate(split(doc["text"], 600, count)):
            rows += [{"id": f"{doc['id']}/{p}/{k}", "doc_id": doc["id"],
                      "instruction": f"この文章の{k + 1}番目の文は何を述べていますか。", "response": sentence.strip(),
                      "context": passage, "generator": "scripted", "source": "fineweb"}
                     for k, sentence in enumerate(sentences(passage)[:5])]
    rows += [{"id": f"own/{k}", "doc_id": "own", "instruction": q, "response": a, "context": None,
              "generator": "scripted"} for k, (q, a) in enumerate([("日本の首都は？", "東京です。"), ("挨拶して", "こんにちは。")])]
    folder = tmp_path_factory.mktemp("passages") / "synth"
    write_parquet(folder / "data" / "part-00000.parquet", rows)
    Stage("synth", folder, {}).finish({})
    return folder


def peft_merged(base: str, train_dir: Path) -> dict[str, torch.Tensor]:
    """The reference: peft's merge_and_unload on the base loaded in float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve(base), dtype=torch.float32)
    return PeftModel.from_pretrained(model, train_dir / "adapter").merge_and_unload().state_dict()


def tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_merge_equals_peft(base: str, train_dir: Path, merged: Path, dtype: torch.dtype) -> None:
    ours, ref, before = tensors(merged), peft_merged(base, train_dir), tensors(merge.base_folder(base))
    assert set(ours) == set(before)  # the base's tensor names, nothing added or lost (a tied head stays tied)
    changed = {n for n in ours if not torch.equal(before[n].to(dtype), ours[n])}
    # Compared by module path: a multimodal checkpoint stores its language model under other `model.` levels than
    # the loaded model (and so peft) names it.
    adapter_modules = {merge.without_model_levels(k.removeprefix("base_model.model.").split(".lora_")[0]
                                                  .removesuffix(".weight").removesuffix(".base_layer"))
                       for k in tensors(train_dir / "adapter")}
    assert changed and {merge.without_model_levels(n.removesuffix(".weight")) for n in changed} <= adapter_modules
    ref = {merge.without_model_levels(k): v for k, v in ref.items()}
    for name, t in ours.items():
        assert t.dtype == dtype, name
        # Within one rounding step of the storage dtype (the same float32 sum, rounded once).
        torch.testing.assert_close(t, ref[merge.without_model_levels(name)].to(dtype), rtol=torch.finfo(dtype).eps,
                                   atol=0, msg=name)


def overrides(model: str, **train) -> list[str]:
    """--set style overrides for a fast CPU run: short rows, no checkpointing recompute, LoRA unless told."""
    base = {"max_length": 256, "batch_size": 1, "gradient_checkpointing": False, "qlora": False,
            "learning_rate": 5e-3, "max_steps": 4, "save_every": 2, "eval_fraction": 0.05}
    return [f"model.name={model}"] + [f"train.{k}={v}" for k, v in {**base, **train}.items()]


def random_rows(vocab: int, n: int, seq: int) -> list[dict]:
    """Packed-row dicts of random ids, each with a prompt part that carries no loss (as our SFT rows)."""
    import random

    rng = random.Random(0)
    out = []
    for _ in range(n):
        ids = [rng.randrange(vocab - 2) for _ in range(seq)]
        prompt = rng.randrange(8, seq // 2)
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "seq_lengths": [seq]})
    return out


def loss_log():
    """A Trainer callback that keeps each logged training loss in `.losses`."""
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        def __init__(self):
            self.losses = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    return LossLog()


def offload_hooks(trainer):
    """The offload hooks `make_trainer` installed, or None."""
    from ezoforge.train.offload import OffloadCheckpoints

    return next((c.hooks for c in trainer.callback_handler.callbacks if isinstance(c, OffloadCheckpoints)), None)


def train_until_killed(args: list[str], out, step: int, command: str = "train") -> None:
    """Run `ezo COMMAND ARGS --out OUT` (train, prefer) and SIGKILL it once checkpoint `step` is complete (and
    before DONE)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "ezoforge", command, *args, "--out", str(out)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    marker = out / "checkpoints" / f"step-{step:06d}" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert marker.exists(), err[-3000:]
    assert not (out / "DONE").exists(), "the run ended before it could be killed"
