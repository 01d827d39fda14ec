import json

import pytest
import torch
from typer.testing import CliRunner

from ezoforge.cli import app
from ezoforge.config import load_recipe
from ezoforge.errors import ModelError
from ezoforge.train import merge
from ezoforge.train import run as train_run
from trainkit import elyza_rows, overrides, tiny_model  # noqa: F401  (fixtures)

runner = CliRunner()


@pytest.fixture(scope="module")
def train_dir(tiny_model, elyza_rows, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("train") / "run"
    recipe = load_recipe(None, overrides(tiny_model, max_steps=2, save_every=2, learning_rate=2e-2))
    train_run.run(recipe, [elyza_rows], out)
    return out


@pytest.fixture(scope="module")
def merged(train_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "m"
    merge.run(train_dir, out, "float32")
    return out


def test_merged_logits_match_base_plus_adapter(merged, train_dir, tiny_model):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    x = torch.tensor([[1, 200, 3000, 40000, 5, 60, 700, 2]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        plain = base(input_ids=x).logits
        adapted = PeftModel.from_pretrained(base, train_dir / "adapter")(input_ids=x).logits
        standalone = AutoModelForCausalLM.from_pretrained(merged)(input_ids=x).logits
    assert (adapted - plain).abs().max() > 1e-2  # the adapter matters, so agreement below means something
    torch.testing.assert_close(standalone, adapted, atol=1e-4, rtol=1e-4)


def test_merged_folder_is_a_standalone_model(merged):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert list(merged.glob("*.safetensors")) and (merged / "DONE").exists()
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.apply_chat_template([{"role": "user", "content": "こんにちは"}], tokenize=False,
                                   add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id


def test_generate_agrees_between_merged_and_base_with_adapter(merged, train_dir, tiny_model):  # noqa: F811
    def reply(*model_args):
        result = runner.invoke(app, ["generate", *model_args, "--prompt", "日本の首都は？", "--max-new-tokens", "12",
                                     "--dtype", "float32"])
        assert result.exit_code == 0, result.output
        return result.stdout.strip()

    text = reply("--model", str(merged))
    assert text and text == reply("--model", tiny_model, "--adapter", str(train_dir / "adapter"))


def test_bf16_merge_of_a_qlora_adapter_starts_from_full_precision(tiny_model, elyza_rows, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from ezoforge.train.model import four_bit_problem

    if four_bit_problem(torch.device("cpu")):
        pytest.skip("bitsandbytes 4-bit does not train on this CPU")
    recipe = load_recipe(None, overrides(tiny_model, qlora=True, max_steps=2, save_every=2))
    train_run.run(recipe, [elyza_rows], tmp_path / "t")
    result = runner.invoke(app, ["merge", str(tmp_path / "t"), "--out", str(tmp_path / "m"), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.dtype == torch.bfloat16 and "Linear4bit" not in {type(m).__name__ for m in model.modules()}


def test_merge_refuses_an_unfinished_train_folder(tmp_path):
    with pytest.raises(ModelError, match="not a finished `ezo train` folder"):
        merge.run(tmp_path, tmp_path / "m")
