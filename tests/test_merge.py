"""`ezo merge` streams the base's safetensors tensor by tensor; it must agree with peft's merge_and_unload on every
tensor, keep the base's shard layout and names, and hold memory that does not grow with the model.

Adapters are made directly with peft (lora_B randomised, so the merge moves the weights) in a DONE-marked train
folder: no training, and no data beyond the package's own."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import BUNDLED
from ezoforge.cli import app
from ezoforge.errors import ModelError
from ezoforge.models import resolve
from ezoforge.stage import Stage
from ezoforge.stages import load_recipe
from ezoforge.train import merge
from ezoforge.train import run as train_run
from trainkit import assert_merge_equals_peft, overrides, tensors, tiny_model  # noqa: F401  (fixtures)

runner = CliRunner()
DEMO_TASKS = Path(merge.__file__).parents[1] / "data" / "tasks" / "demo-tasks.jsonl"
ADAPTERS = {
    "all-linear": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    # rsLoRA scaling, an embedding LoRA (transposed factors, its base layer saved beside it) and a module saved whole
    "rslora-embedding-saved-head": dict(r=4, lora_alpha=8, use_rslora=True, modules_to_save=["lm_head"],
                                        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    "alpha-pattern": dict(r=4, lora_alpha=8, target_modules=["o_proj", "up_proj"], alpha_pattern={"up_proj": 64}),
}


def make_train_folder(base: str, out: Path, seed: int = 0, **lora) -> Path:
    """A finished `ezo train` folder whose adapter is made with peft on `base`, its lora_B randomised."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage = Stage("train", out, {"adapter": {"seed": seed, **lora}}, model={"name": base})
    stage.start()
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve(base), dtype=torch.float32),
                           LoraConfig(**lora))
    for name, p in model.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            torch.nn.init.normal_(p, std=0.05)
        elif "modules_to_save" in name:
            p.data += 0.05 * torch.randn_like(p)
    model.save_pretrained(out / "adapter")
    AutoTokenizer.from_pretrained(resolve(base)).save_pretrained(out / "adapter")
    stage.finish({})
    return out


def weight_map(folder) -> dict[str, str]:
    return json.loads((Path(folder) / merge.INDEX).read_text())["weight_map"]


@pytest.fixture(scope="module")
def sharded_base(tiny_model, tmp_path_factory):  # noqa: F811
    """The 2-layer Llama saved in several shards (the embedding and head each fill one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharded") / "base"
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(out, max_shard_size="2MB")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    assert len(list(out.glob("*.safetensors"))) >= 3
    return str(out)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_streamed_merge_equals_peft_on_a_sharded_llama(sharded_base, adapter, dtype, tmp_path):
    train_dir = make_train_folder(sharded_base, tmp_path / "train", **ADAPTERS[adapter])
    stats = merge.run(train_dir, tmp_path / "m", dtype)
    assert_merge_equals_peft(sharded_base, train_dir, tmp_path / "m", getattr(torch, dtype))
    assert weight_map(tmp_path / "m") == weight_map(sharded_base)  # same names, same shard files
    assert stats["shards"] == len(set(weight_map(sharded_base).values())) and stats["dtype"] == dtype


def test_streamed_merge_equals_peft_on_the_bundled_gguf_model(tmp_path):
    train_dir = make_train_folder(BUNDLED, tmp_path / "train", r=4, lora_alpha=8, target_modules="all-linear")
    result = runner.invoke(app, ["merge", str(train_dir), "--out", str(tmp_path / "m")])  # bf16 by default
    assert result.exit_code == 0, result.output
    assert_merge_equals_peft(BUNDLED, train_dir, tmp_path / "m", torch.bfloat16)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"]


@pytest.fixture(scope="module")
def tiny_train(tiny_model, tmp_path_factory):  # noqa: F811
    return make_train_folder(tiny_model, tmp_path_factory.mktemp("train") / "run", **ADAPTERS["all-linear"])


@pytest.fixture(scope="module")
def merged(tiny_train, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "m"
    merge.run(tiny_train, out, "float32")
    return out


def test_merged_logits_match_base_plus_adapter(merged, tiny_train, tiny_model):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    x = torch.tensor([[1, 200, 3000, 40000, 5, 60, 700, 2]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        plain = base(input_ids=x).logits
        adapted = PeftModel.from_pretrained(base, tiny_train / "adapter")(input_ids=x).logits
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
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_a_rerun_is_a_no_op_and_another_dtype_needs_force(merged, tiny_train):
    from ezoforge.errors import ConfigError

    stamp = (merged / "DONE").stat().st_mtime_ns
    assert merge.run(tiny_train, merged, "float32")["dtype"] == "float32"
    assert (merged / "DONE").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="dtype"):
        merge.run(tiny_train, merged, "bfloat16")
    assert (merged / "DONE").stat().st_mtime_ns == stamp


def test_generate_agrees_between_merged_and_base_with_adapter(merged, tiny_train, tiny_model):  # noqa: F811
    def reply(*model_args):
        result = runner.invoke(app, ["generate", *model_args, "--prompt", "日本の首都は？", "--max-new-tokens", "12",
                                     "--dtype", "float32"])
        assert result.exit_code == 0, result.output
        return result.stdout.strip()

    text = reply("--model", str(merged))
    assert text and text == reply("--model", tiny_model, "--adapter", str(tiny_train / "adapter"))


def test_auto_keeps_the_bases_dtype(tiny_model, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(base)
    train_dir = make_train_folder(str(base), tmp_path / "train", **ADAPTERS["all-linear"])
    assert merge.run(train_dir, tmp_path / "m", "auto")["dtype"] == "bfloat16"
    assert_merge_equals_peft(str(base), train_dir, tmp_path / "m", torch.bfloat16)


def test_a_hub_id_base_is_read_from_its_cached_snapshot(sharded_base, tmp_path, monkeypatch):
    """Offline, a hub id resolves to its snapshot in the hub cache (laid out as huggingface_hub does)."""
    import shutil

    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--ezo-test--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(sharded_base, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    train_dir = make_train_folder("ezo-test/tiny-llama", tmp_path / "train", **ADAPTERS["all-linear"])
    merge.run(train_dir, tmp_path / "m", "float32")
    assert_merge_equals_peft("ezo-test/tiny-llama", train_dir, tmp_path / "m", torch.float32)


def rewrite_adapter(train_dir: Path, rename: dict[str, str]) -> None:
    from safetensors.torch import load_file, save_file

    file = train_dir / "adapter" / "adapter_model.safetensors"
    weights = load_file(file)
    save_file({rename.get(k, k): v for k, v in weights.items()}, file, metadata={"format": "pt"})


def test_an_adapter_key_that_matches_no_base_tensor_is_named(tiny_model, tmp_path):  # noqa: F811
    train_dir = make_train_folder(tiny_model, tmp_path / "train", r=4, target_modules=["q_proj"])
    stray = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"
    rewrite_adapter(train_dir, {"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": stray,
                                "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight":
                                    stray.replace("lora_A", "lora_B")})
    with pytest.raises(ModelError, match=f"key {stray} matches no base tensor"):
        merge.run(train_dir, tmp_path / "m", "float32")
    assert not (tmp_path / "m").exists() and not (tmp_path / ".m.partial").exists()


def test_adapter_weights_it_cannot_fold_are_named(tiny_model, tmp_path):  # noqa: F811
    train_dir = make_train_folder(tiny_model, tmp_path / "train", r=4, target_modules=["q_proj"])
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    rewrite_adapter(train_dir, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": key})
    with pytest.raises(ModelError, match=f"key {key}: an adapter weight `ezo merge` does not fold"):
        merge.run(train_dir, tmp_path / "m", "float32")
    dora = make_train_folder(tiny_model, tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ModelError, match="use_dora is set"):
        merge.run(dora, tmp_path / "m", "float32")


def test_a_base_without_safetensors_fails_clearly(tiny_model, tmp_path):  # noqa: F811
    import shutil

    train_dir = make_train_folder(tiny_model, tmp_path / "train", r=4, target_modules=["q_proj"])
    base = tmp_path / "bin-base"
    base.mkdir()
    for f in Path(tiny_model).iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, base / f.name)
    torch.save({}, base / "pytorch_model.bin")
    info = json.loads((train_dir / "DONE").read_text())
    info["settings"]["model"]["name"] = str(base)
    (train_dir / "DONE").write_text(json.dumps(info))
    with pytest.raises(ModelError, match=r"holds no safetensors weights \(pytorch_model.bin\)"):
        merge.run(train_dir, tmp_path / "m", "float32")


MEASURE = """
import json, sys
from pathlib import Path
import peft.utils.other, safetensors.torch, transformers  # imports weigh the same whatever the model's size
from transformers import AutoConfig, AutoTokenizer, GenerationConfig
from ezoforge.train import merge

def status(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])

added = []
for i, train_dir in enumerate(sys.argv[1:]):
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) here, at the current RSS
    before = status("VmRSS:")
    merge.run(Path(train_dir), Path(f"{train_dir}-merged-{i}"), "float32")
    added.append((status("VmHWM:") - before) / 1024)
print(json.dumps(added))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_merge_memory_does_not_grow_with_the_model(tiny_model, tmp_path):  # noqa: F811
    """A 2-layer and a 16-layer Llama in 8 MB shards, merged in one fresh process (the small one first, to pay the
    lazy imports a first merge makes, then the large, then the small again): the peak each merge adds (MiB) stays
    near one shard, a few copies of the largest tensor and the adapter, and does not grow with the weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    def mib(folder: Path, pattern: str) -> list[float]:
        return [f.stat().st_size / 2**20 for f in folder.glob(pattern)]

    folders = []
    for layers in (16, 2):
        cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=4)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / f"llama-{layers}", max_shard_size="8MB")
        AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / f"llama-{layers}")
        folders.append(make_train_folder(str(tmp_path / f"llama-{layers}"), tmp_path / f"train-{layers}", r=4,
                                         target_modules="all-linear"))
    proc = subprocess.run([sys.executable, "-c", MEASURE, *map(str, [folders[1], *folders])], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _first, large, small = json.loads(proc.stdout.strip().splitlines()[-1])
    weights = [sum(mib(tmp_path / f"llama-{n}", "*.safetensors")) for n in (16, 2)]
    adapters = [sum(mib(f / "adapter", "*.safetensors")) for f in folders]
    shard = [max(mib(tmp_path / f"llama-{n}", "*.safetensors")) for n in (16, 2)]
    assert weights[0] - weights[1] > 55  # float32 weights that a whole-model merge would hold at least once
    # Bounds: the shard, 4 float32 copies of the largest tensor (4 MiB), the adapter, and 64 MiB for the tokenizer
    # and configs the folder gets, whatever the model's size. The first merge also pays lazy imports, so the bound
    # holds from the second on.
    assert large < shard[0] + 4 * 4 + adapters[0] + 64 and small < shard[1] + 4 * 4 + adapters[1] + 64, (small, large)
    # Growth: the adapter's, plus allocator noise of a few MiB; a whole-model merge grows by the weights at least.
    assert large - small < adapters[0] - adapters[1] + 0.25 * (weights[0] - weights[1]), (large, small, weights)


def test_bf16_merge_of_a_qlora_adapter_starts_from_full_precision(tiny_model, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from ezoforge.train.model import four_bit_problem

    if four_bit_problem(torch.device("cpu")):
        pytest.skip("bitsandbytes 4-bit does not train on this CPU")
    rows = tmp_path / "rows.jsonl"
    with open(DEMO_TASKS, encoding="utf-8") as src, open(rows, "w", encoding="utf-8") as dst:
        for line in src:
            row = json.loads(line)
            dst.write(json.dumps({"instruction": row["input"], "response": row["output"]}, ensure_ascii=False) + "\n")
    recipe = load_recipe(None, overrides(tiny_model, qlora=True, max_steps=2, save_every=2))
    train_run.run(recipe, [rows], tmp_path / "t")
    result = runner.invoke(app, ["merge", str(tmp_path / "t"), "--out", str(tmp_path / "m"), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.dtype == torch.bfloat16 and "Linear4bit" not in {type(m).__name__ for m in model.modules()}


def test_merge_refuses_an_unfinished_train_folder(tmp_path):
    with pytest.raises(ModelError, match="not a finished `ezo train` folder"):
        merge.run(tmp_path, tmp_path / "m")
