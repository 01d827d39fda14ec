"""CUDA-only checks of the training path and of `ezo run`'s stage processes (`pytest -m gpu`; bench/gpu_check.sh runs them
on the lent GPU): the kernels only CUDA runs (TRL's Triton fused LM head, Liger's, SDPA over packed rows with their
mask, bitsandbytes' 4-bit), offloaded checkpointing, and stages giving CUDA memory back. 2-layer Llamas with random
weights and their own tokenizers: nothing here needs the hub or ../shared."""
import json
import tempfile
from pathlib import Path

import pytest
import torch

from trainkit import assert_packed_rows_stay_apart, loss_log, offload_hooks, random_rows

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
    """(4-bit or not, the logged losses, the trainer) of `steps` SFT steps on the same 2 random rows."""
    from ezoforge.train.model import load_base, use_qlora
    from ezoforge.train.run import make_trainer
    from ezoforge.train.settings import TrainConfig

    config = TrainConfig(lora_dropout=0.0, batch_size=2, max_length=SEQ, max_steps=steps, warmup_ratio=0.0,
                         learning_rate=2e-3, eval_fraction=0.0, save_every=10**6, **cfg)
    torch.manual_seed(0)
    qlora = use_qlora(config, CUDA)
    model = load_base(model_dir, config, CUDA, qlora)
    losses = loss_log()
    data = random_rows(VOCAB, 2, SEQ) * steps  # learnable: the same 2 rows again
    trainer = make_trainer(model, tokenizer(), config, data, [], Path(tempfile.mkdtemp()), CUDA, [losses])
    trainer.train()
    return qlora, losses.losses, trainer


def test_fused_lm_head_runs_in_triton_and_matches_the_plain_loss_on_cuda(model_dir):
    """SFT scores its loss through TRL's fused, chunked LM head: on CUDA its Triton kernels run, forward and
    backward, and give HF's full-logits loss and LoRA gradients (tests/test_train_memory.py: the same on the CPU)."""
    from ezoforge.train.model import load_base
    from ezoforge.train.run import make_trainer
    from ezoforge.train.settings import TrainConfig
    from ezoforge.train.trainer import kernels

    cfg = TrainConfig(qlora=False, lora_dropout=0.0, batch_size=2, max_length=SEQ, max_steps=1, eval_fraction=0.0,
                      gradient_checkpointing=False)
    model = load_base(model_dir, cfg, CUDA, False, "float32").to(CUDA)
    data = random_rows(VOCAB, 2, SEQ)
    trainer = make_trainer(model, tokenizer(), cfg, data, [], Path(tempfile.mkdtemp()), CUDA)
    peft_model = trainer.model
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # zero at init: give the A matrices a gradient too
            p.data.normal_(0, 0.05)
    batch = {k: v.to(CUDA) for k, v in trainer.data_collator(data).items()}
    lora = [p for p in peft_model.parameters() if p.requires_grad]

    def loss_and_grad(fn):
        peft_model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in lora])

    ours, ours_grad = loss_and_grad(lambda: trainer.compute_loss(peft_model, dict(batch)))
    plain, plain_grad = loss_and_grad(lambda: peft_model(**batch).loss)  # HF: full logits + cross-entropy
    assert ours == pytest.approx(plain, rel=1e-3)
    assert torch.nn.functional.cosine_similarity(ours_grad, plain_grad, dim=0) > 0.999
    used = kernels(peft_model)
    assert used["fused_lm_head"] is True
    assert {"trl.kernels.chunked_logprob._forward_kernel",
            "trl.kernels.chunked_logprob._backward_kernel"} <= set(used["triton_kernels"])


def test_liger_kernels_patch_the_model_and_train_on_cuda(model_dir):
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (make gpu-bundle carries it)")
    from ezoforge.train.trainer import kernels

    _, losses, trainer = train(model_dir, 6, qlora=True, liger=True)
    used = kernels(trainer.model)
    assert used["liger_modules"] == 1 + 2 * 3  # the final norm; each layer's MLP and its two norms
    assert any(k.startswith("liger_kernel.ops.") for k in used["triton_kernels"]), used["triton_kernels"]
    assert used["fused_lm_head"] is True  # Liger's own fused loss stays off: TRL's head scores the loss
    assert torch.isfinite(torch.tensor(losses)).all() and losses[-1] < losses[0]


def test_packed_rows_stay_apart_through_sdpa_on_cuda(model_dir):
    """Packed rows as SFT feeds them (positions restart at each example, no attention mask): on CUDA, SDPA runs with
    the block-diagonal mask transformers derives from the positions, so each example's logits are its own."""
    from transformers import AutoModelForCausalLM

    from ezoforge.train.data import PackedCollator

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    model = model.to(CUDA).eval()
    layout = [[70, 50, 30], [90]]  # three examples in the first row; the second is padded
    ids = torch.randint(0, VOCAB - 2, (sum(map(sum, layout)),), generator=torch.Generator().manual_seed(0)).tolist()
    rows, start = [], 0
    for lengths in layout:
        rows.append({"input_ids": ids[start:start + sum(lengths)], "labels": ids[start:start + sum(lengths)],
                     "seq_lengths": lengths})
        start += sum(lengths)
    batch = {k: v.to(CUDA) for k, v in PackedCollator(pad_id=VOCAB - 1)(rows).items()}
    assert_packed_rows_stay_apart(model, batch, layout, atol=1e-4)


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

    from ezoforge.pipeline import run_step, run_step_in_child
    from ezoforge.stages import Recipe

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


def test_qlora_trains_on_cuda(model_dir):
    from ezoforge.train.trainer import kernels

    qlora, losses, trainer = train(model_dir, 8, qlora=True)
    hooks = offload_hooks(trainer)
    assert qlora is True and kernels(trainer.model)["linear4bit_modules"] == 2 * 7  # q k v o gate up down per layer
    assert hooks is not None and hooks.moved_bytes > 0  # auto: offloaded on CUDA with checkpointing
    assert torch.isfinite(torch.tensor(losses)).all() and losses[-1] < losses[0]


def test_offloaded_checkpointing_changes_no_loss_on_cuda(model_dir):
    _, plain, trainer = train(model_dir, 6, qlora=False, offload_activations=False)
    _, offloaded, offloading = train(model_dir, 6, qlora=False, offload_activations=True)
    none, hooks = offload_hooks(trainer), offload_hooks(offloading)
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
