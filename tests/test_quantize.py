"""model.quantize: bitsandbytes int8 / nf4 for answers, auto's choice, and stated values that cannot be honoured."""
import json
import logging
import math
from importlib.resources import files

import psutil
import pytest
import torch
from typer.testing import CliRunner

from conftest import BUNDLED
from ezoforge.cli import app
from ezoforge.errors import ConfigError, ModelError
from ezoforge.models import GIB, auto_quantize, load, model_identity, pick_quantize, weight_bytes

HELDOUT = files("ezoforge") / "data" / "heldout" / "heldout-ja.jsonl"
PASSAGES_FAST = 3  # of 26: the default run stays short; `-m slow` scores them all


def _llama_folder(path, layers: int = 1, vocab: int = 32000, **extra) -> str:
    """A config-only folder of Llama-3.1-70B-shaped layers (no weights): enough for every decision made before
    loading, and a load that went ahead would fail."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=layers, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=vocab, **extra).save_pretrained(path)
    return str(path)


def _layers_for(float32_bytes: float) -> int:
    per_layer = 8192 * (2 * 8192 + 2 * 1024) + 3 * 8192 * 28672  # q, o, k, v, gate, up, down
    return math.ceil(float32_bytes / (per_layer * 4))


def test_auto_picks_none_on_this_cpu_and_says_why(bundled, caplog):
    auto_quantize.cache_clear()
    with caplog.at_level(logging.INFO, logger="ezoforge.models"):
        assert pick_quantize(BUNDLED, "auto", "cpu") == "none"
    assert "model.quantize=auto: none" in caplog.text and "GiB free on cpu" in caplog.text
    assert bundled.quantize == "none"
    assert not any("bitsandbytes" in type(m).__module__ for m in bundled.model.modules())


def test_auto_picks_nf4_where_the_weights_do_not_fit(tmp_path, caplog):
    # float32 weights twice the RAM available now: nf4 (~1/8 of that) fits.
    big = _llama_folder(tmp_path / "big", _layers_for(2 * psutil.virtual_memory().available))
    auto_quantize.cache_clear()
    with caplog.at_level(logging.INFO, logger="ezoforge.models"):
        assert pick_quantize(big, "auto", "cpu") == "nf4"
    assert "model.quantize=auto: nf4" in caplog.text
    # The cache key holds the quantization used: auto's nf4 is keyed as a stated nf4, not as the float model.
    assert model_identity(big, device="cpu") == model_identity(big, device="cpu", quantize="nf4")
    assert model_identity(big, device="cpu") != model_identity(big, device="cpu", quantize="none")


def test_auto_fails_before_loading_when_not_even_nf4_fits(tmp_path):
    # Embeddings and the output head stay unquantized: here they alone take 1.5x the RAM available now.
    huge = _llama_folder(tmp_path / "huge", vocab=math.ceil(1.5 * psutil.virtual_memory().available / (8192 * 4 * 2)))
    auto_quantize.cache_clear()
    with pytest.raises(ModelError, match=r"still .* GiB in nf4.*model\.quantize=auto"):
        load(huge, device="cpu")  # the folder has no weights: a load that started would fail otherwise


def test_cache_keys_follow_the_quantization():
    keys = {q: model_identity(BUNDLED, device="cpu", quantize=q) for q in ("auto", "none", "int8", "nf4")}
    assert keys["auto"] == keys["none"]  # auto resolves to none here
    assert len({keys["none"], keys["int8"], keys["nf4"]}) == 3


def test_weight_bytes_of_a_70b():
    linear, kept = 68.45e9, 2.1e9  # Llama-3.1-70B: decoder linears; embeddings, head and norms
    assert weight_bytes(linear, "none", torch.bfloat16, kept) / GIB == pytest.approx(131.4, abs=0.1)
    assert weight_bytes(linear, "int8", torch.bfloat16, kept) / GIB == pytest.approx(67.7, abs=0.1)
    assert weight_bytes(linear, "nf4", torch.bfloat16, kept) / GIB == pytest.approx(36.8, abs=0.1)


def test_a_stated_quantization_of_a_quantized_checkpoint_fails_before_loading(tmp_path):
    awq = _llama_folder(tmp_path / "awq", quantization_config={"quant_method": "awq", "bits": 4})
    with pytest.raises(ConfigError, match=r"model\.quantize is nf4 but .* is already quantized \(awq\)"):
        load(awq, device="cpu", quantize="nf4")  # no weights in the folder: reaching the load would fail otherwise
    auto_quantize.cache_clear()
    assert pick_quantize(awq, "auto", "cpu") == "none"


def test_the_cli_flag_reaches_the_load(tmp_path):
    awq = _llama_folder(tmp_path / "awq", quantization_config={"quant_method": "awq", "bits": 4})
    result = CliRunner().invoke(app, ["generate", "--model", awq, "--quantize", "int8", "--device", "cpu",
                                      "--prompt", "こんにちは"])
    assert isinstance(result.exception, ConfigError) and "model.quantize is int8" in str(result.exception)
    result = CliRunner().invoke(app, ["generate", "--model", awq, "--quantize", "int4", "--prompt", "こんにちは"])
    assert isinstance(result.exception, ConfigError) and "model.quantize" in str(result.exception)


def _perplexity(loaded, texts: list[str]) -> float:
    from ezoforge.eval.likelihood import passage_nll

    scored = passage_nll(loaded, texts, 512)
    return math.exp(sum(nll for nll, _ in scored) / sum(n for _, n in scored))


# nf4 on a few passages in `make test`; int8 (bitsandbytes' slow CPU path) and all passages with `-m slow`.
@pytest.mark.parametrize("quantize, bound, passages", [
    pytest.param("nf4", 1.40, PASSAGES_FAST, id=f"nf4-first-{PASSAGES_FAST}"),
    pytest.param("int8", 1.05, PASSAGES_FAST, id=f"int8-first-{PASSAGES_FAST}", marks=pytest.mark.slow),
    pytest.param("nf4", 1.40, None, id="nf4-all", marks=pytest.mark.slow),
    pytest.param("int8", 1.05, None, id="int8-all", marks=pytest.mark.slow)])
def test_quantized_perplexity_stays_near_float32(bundled, quantize, bound, passages):
    import bitsandbytes as bnb

    texts = [json.loads(line)["text"] for line in HELDOUT.read_text(encoding="utf-8").splitlines()][:passages]
    base = _perplexity(bundled, texts)
    layer = {"int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}[quantize]
    loaded = load(BUNDLED, device="cpu", quantize=quantize)
    assert loaded.quantize == quantize
    assert sum(isinstance(m, layer) for m in loaded.model.modules()) == 7 * loaded.model.config.num_hidden_layers
    ppl = _perplexity(loaded, texts)
    print(f"perplexity over {len(texts)} passages: float32 {base:.2f}, {quantize} {ppl:.2f}")
    assert ppl < base * bound
