"""Shared pieces of the train/merge tests: a 2-layer Llama with the bundled SmolLM2 tokenizer, and the ELYZA rows."""
import json

import pytest
import torch

from conftest import BUNDLED
from ezoforge.config import bundled_data


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A randomly initialised 2-layer Llama that speaks the bundled tokenizer and its chat template."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ezoforge.models import load_tokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = load_tokenizer(BUNDLED)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


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
