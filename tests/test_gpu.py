"""CUDA-only checks of the training path (`pytest -m gpu`; bench/gpu_check.sh runs them on the lent GPU).
A 2-layer Llama with random weights and its own id-level tokenizer: nothing here needs the hub or ../shared."""
import tempfile
from pathlib import Path

import pytest
import torch

from trainkit import loss_log, offload_hooks, random_rows

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
VOCAB, SEQ = 4096, 512


def tokenizer():
    """The trainer reads only pad/eos ids from its tokenizer: rows are token ids already."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<eos>": VOCAB - 2, "<pad>": VOCAB - 1}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = tmp_path_factory.mktemp("llama2l")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return str(out)


def train(model_dir: str, steps: int, **cfg):
    from ezoforge.config import TrainConfig
    from ezoforge.train.model import load_base, use_qlora
    from ezoforge.train.run import make_trainer

    config = TrainConfig(lora_dropout=0.0, batch_size=2, max_length=SEQ, max_steps=steps, warmup_ratio=0.0,
                         learning_rate=2e-3, eval_fraction=0.0, save_every=10**6, **cfg)
    torch.manual_seed(0)
    qlora = use_qlora(config, CUDA)
    model = load_base(model_dir, config, CUDA, qlora)
    losses = loss_log()
    data = random_rows(VOCAB, 2, SEQ) * steps  # learnable: the same 2 rows again
    trainer = make_trainer(model, tokenizer(), config, data, [], Path(tempfile.mkdtemp()), CUDA, [losses])
    trainer.train()
    return qlora, losses.losses, offload_hooks(trainer)


def test_qlora_trains_on_cuda(model_dir):
    qlora, losses, hooks = train(model_dir, 8, qlora=True)
    assert qlora is True
    assert hooks is not None and hooks.moved_bytes > 0  # auto: offloaded on CUDA with checkpointing
    assert torch.isfinite(torch.tensor(losses)).all() and losses[-1] < losses[0]


def test_offloaded_checkpointing_changes_no_loss_on_cuda(model_dir):
    _, plain, none = train(model_dir, 6, qlora=False, offload_activations=False)
    _, offloaded, hooks = train(model_dir, 6, qlora=False, offload_activations=True)
    assert none is None and hooks.moved_bytes > 0
    # The same kernels on the same inputs; only where the inputs waited differs (the tolerance is for the
    # attention backward's atomics, which make two bf16 CUDA runs differ slightly even without offloading).
    assert offloaded == pytest.approx(plain, rel=1e-3)


def test_offload_hooks_return_the_same_tensors_under_memory_pressure():
    """Side-stream copies racing the compute stream: many layers' inputs out and back, compared bit for bit."""
    from torch.utils.checkpoint import checkpoint

    from ezoforge.train.offload import BoundaryOffload

    torch.manual_seed(0)
    layers = [torch.nn.Linear(1024, 1024, device=CUDA) for _ in range(24)]
    x = torch.randn(8, 512, 1024, device=CUDA, requires_grad=True)

    def run(offload: bool):
        hooks = BoundaryOffload(CUDA)
        h = x
        for layer in layers:
            fn = lambda t, layer=layer: torch.nn.functional.gelu(layer(t)) + t  # noqa: E731
            if offload:
                with hooks:
                    h = checkpoint(fn, h, use_reentrant=False)
            else:
                h = checkpoint(fn, h, use_reentrant=False)
        grads = torch.autograd.grad(h.square().mean(), [x, *[m.weight for m in layers]])
        return grads, hooks.moved_bytes

    plain, _ = run(False)
    offloaded, moved = run(True)
    assert moved == 24 * x.numel() * 4
    for a, b in zip(plain, offloaded):
        assert torch.equal(a, b)
