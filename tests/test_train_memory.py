"""The two memory levers of `ezo train`: offloaded checkpointing changes no number, and the loss never builds the
(tokens x vocab) logits yet equals the plain loss."""
import tempfile
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from ezoforge.models import load_tokenizer
from ezoforge.train.run import make_trainer
from ezoforge.train.settings import TrainConfig
from trainkit import loss_log, offload_hooks, random_rows, tiny_model  # noqa: F401  (fixture)

CPU = torch.device("cpu")
SEQ = 128
STEPS = 5


def train(path: str, offload, steps: int = STEPS):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.config.use_cache = False
    tok = load_tokenizer(path)
    cfg = TrainConfig(qlora=False, lora_dropout=0.0, batch_size=2, max_length=SEQ, max_steps=steps, warmup_ratio=0.0,
                      learning_rate=5e-3, eval_fraction=0.0, save_every=10**6, gradient_checkpointing=True,
                      offload_activations=offload)
    losses = loss_log()
    data = random_rows(model.config.vocab_size, 2, SEQ) * steps  # learnable: the same 2 rows again
    trainer = make_trainer(model, tok, cfg, data, [], Path(tempfile.mkdtemp()), CPU, [losses])
    trainer.train()
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return losses.losses, lora, offload_hooks(trainer)


def test_offloaded_checkpointing_gives_identical_losses(tiny_model):  # noqa: F811
    plain, plain_lora, none = train(tiny_model, False)
    offloaded, offloaded_lora, hooks = train(tiny_model, True)
    assert none is None and hooks is not None
    # Both checkpointed layers' inputs (2 x 128 tokens x hidden 64, float32) went out and came back, every step.
    assert hooks.moved_bytes == STEPS * 2 * (2 * SEQ * 64 * 4)
    assert len(plain) == STEPS and plain[-1] < plain[0]
    assert offloaded == plain  # exactly: the same numbers come back
    assert all(torch.equal(offloaded_lora[n], p) for n, p in plain_lora.items())
    print(f"{STEPS} steps, offload off/on: first loss {plain[0]:.6f}/{offloaded[0]:.6f}, last {plain[-1]:.6f}/"
          f"{offloaded[-1]:.6f}; {hooks.moved_bytes:,} bytes went to host memory and back")


def test_auto_offload_stays_off_on_cpu_and_true_without_checkpointing_is_refused(tiny_model):  # noqa: F811
    from ezoforge.errors import ConfigError
    from ezoforge.train.offload import offload_checkpoints, wants_offload

    assert wants_offload(TrainConfig(), CPU) is False
    assert wants_offload(TrainConfig(offload_activations=True), CPU) is True
    assert wants_offload(TrainConfig(), torch.device("cuda")) is True
    assert wants_offload(TrainConfig(gradient_checkpointing=False), torch.device("cuda")) is False
    with pytest.raises(ValueError, match="needs gradient_checkpointing"):
        TrainConfig(offload_activations=True, gradient_checkpointing=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)  # no layer checkpoints: nothing to offload
    with pytest.raises(ConfigError, match="offload_activations: no layer of this model checkpoints"):
        offload_checkpoints(model, CPU)
    model.gradient_checkpointing_enable()
    assert offload_checkpoints(model, CPU) is offload_checkpoints(model, CPU)  # once per model


class LargestFloat(TorchDispatchMode):
    """The most elements of any floating-point tensor an op produced (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


def test_loss_equals_the_plain_loss_without_the_full_logits(tiny_model):  # noqa: F811
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.use_cache = False
    cfg = TrainConfig(qlora=False, lora_dropout=0.0, batch_size=2, max_length=SEQ, max_steps=1, eval_fraction=0.0,
                      gradient_checkpointing=False)
    data = random_rows(model.config.vocab_size, 2, SEQ)
    trainer = make_trainer(model, load_tokenizer(tiny_model), cfg, data, [], Path(tempfile.mkdtemp()), CPU)
    peft_model = trainer.model
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # zero at init: give the A matrices a gradient too
            p.data.normal_(0, 0.05)
    batch = trainer.data_collator(data)
    lora = [p for p in peft_model.parameters() if p.requires_grad]

    def loss_and_grads(fn):
        peft_model.zero_grad(set_to_none=True)
        with LargestFloat() as seen:
            loss = fn()
            loss.backward()
        return loss.item(), [p.grad.clone() for p in lora], seen.largest

    ours, ours_grads, ours_largest = loss_and_grads(lambda: trainer.compute_loss(peft_model, dict(batch)))
    plain, plain_grads, plain_largest = loss_and_grads(lambda: peft_model(**batch).loss)  # HF: full logits + CE
    full_logits = batch["input_ids"].numel() * model.config.vocab_size
    assert plain_largest >= full_logits > ours_largest  # the check sees the logits where they exist
    assert ours == pytest.approx(plain, rel=1e-5)
    for a, b in zip(ours_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    print(f"loss ours {ours:.6f} plain {plain:.6f}; largest float tensor {ours_largest:,} vs full logits "
          f"{full_logits:,}; max grad diff {max((a - b).abs().max().item() for a, b in zip(ours_grads, plain_grads)):.2e}")
