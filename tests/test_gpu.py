"""CUDA-only checks of the training path and of `ezo run`'s stage processes (`pytest -m gpu`; bench/gpu_check.sh runs them
on the lent GPU). 2-layer Llamas with random weights and their own tokenizers: nothing here needs the hub or ../shared."""
import json
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


def byte_chat_model(out: Path) -> str:
    """A 2-layer random Llama with a byte-level tokenizer and a chat template: what eval loads, made here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    cfg = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=256, eos_token_id=257, pad_token_id=258)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_each_stage_gives_its_cuda_memory_back(tmp_path):
    """`ezo run`'s stages in their own processes: between stages this process has allocated nothing on the card
    and the card's free memory is what it was; the same stage run in this process does allocate here."""
    import gc
    from importlib.resources import files

    from ezoforge.config import Recipe
    from ezoforge.pipeline import run_step, run_step_in_child

    passages = files("ezoforge") / "data" / "heldout" / "heldout-ja.jsonl"
    recipe = Recipe.model_validate({
        "workdir": str(tmp_path), "stages": ["eval"],
        "model": {"name": byte_chat_model(tmp_path / "model"), "device": "cuda", "quantize": "none"},
        "eval": {"tasks": [f"ppl:{passages}"], "limit": 2, "cache": str(tmp_path / "cache.sqlite")}})
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    free = torch.cuda.mem_get_info()[0]
    for _ in range(2):  # one stage, then the next
        run_step_in_child("eval-base", recipe, tmp_path, force=True)
        assert torch.cuda.memory_allocated() == base and torch.cuda.max_memory_allocated() == base
        assert abs(torch.cuda.mem_get_info()[0] - free) < 256 * 2**20  # the child's context and tensors are gone
    assert json.loads((tmp_path / "eval-base" / "report.json").read_text())["perplexity"] > 1
    recipe.eval.cache = tmp_path / "other.sqlite"  # nothing cached: the stage loads the model to score
    run_step("eval-base", recipe, tmp_path, force=True)
    assert torch.cuda.max_memory_allocated() > base
