"""Training settings say what they do: the eval cadence is its own (fingerprinted) key, independent of how often
checkpoints are saved, and a stated model.dtype is the dtype the base trains in."""
import json

import pytest
import torch

from ezoforge.stages import load_recipe
from trainkit import overrides, tiny_model  # noqa: F401  (fixture)

ROWS = [("日本の首都はどこですか？", "東京です。"), ("富士山の高さは？", "3776メートルです。"),
        ("一年は何日？", "365日です。"), ("水の沸点は？", "100度です。"), ("月は何色？", "白っぽい灰色です。"),
        ("犬は何科？", "イヌ科です。"), ("桜の季節は？", "春です。"), ("寿司の材料は？", "米と魚です。"),
        ("日本一長い川は？", "信濃川です。"), ("東京タワーの高さは？", "333メートルです。")]


def _pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"instruction": q, "response": a}, ensure_ascii=False) + "\n"
                            for q, a in ROWS), encoding="utf-8")
    return path


def _eval_steps(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "eval_loss" in r]


def test_eval_cadence_does_not_follow_save_every(tiny_model, tmp_path):
    from ezoforge.train.run import run, train_stage

    pairs = _pairs(tmp_path)
    recipe = load_recipe(None, overrides(tiny_model, max_steps=3, save_every=1, eval_every=2, eval_fraction=0.3))
    run(recipe, [pairs], tmp_path / "train")
    # Before step 1, at the cadence and after the last step; checkpoints at every step change none of it.
    assert _eval_steps(tmp_path / "train") == [0, 2, 3]
    saved_less = load_recipe(None, overrides(tiny_model, max_steps=3, save_every=3, eval_every=2, eval_fraction=0.3))
    def settings(r):
        return train_stage(r, [pairs], tmp_path / "unused").settings

    assert settings(saved_less) == settings(recipe)  # save_every is operational
    evaluated_more = load_recipe(None, overrides(tiny_model, max_steps=3, save_every=1, eval_every=1,
                                                 eval_fraction=0.3))
    assert settings(evaluated_more) != settings(recipe)  # eval_every shapes metrics.jsonl


def test_stated_model_dtype_is_the_training_dtype(tiny_model):
    from ezoforge.train.model import load_base

    cfg = load_recipe(None, overrides(tiny_model)).train
    cpu = torch.device("cpu")
    assert load_base(tiny_model, cfg, cpu, qlora=False).dtype == torch.float32  # auto on a CPU
    assert load_base(tiny_model, cfg, cpu, qlora=False, dtype="bfloat16").dtype == torch.bfloat16


def test_cpu_autocast_is_recorded_resolved_and_reaches_the_trainer(tiny_model, tmp_path):
    from ezoforge.errors import ConfigError
    from ezoforge.train.model import use_cpu_autocast
    from ezoforge.train.run import sft_config, train_stage

    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    auto, cpu, pairs = load_recipe(None, overrides(tiny_model)), torch.device("cpu"), _pairs(tmp_path)
    recorded = train_stage(auto, [pairs], tmp_path / "train").settings["output"]["train"]["cpu_autocast"]
    assert recorded is bool(flags & {"avx512_bf16", "amx_tile"})  # auto: where the CPU has bf16 instructions
    for stated in (True, False):
        cfg = auto.train.model_copy(update={"cpu_autocast": stated})
        assert sft_config(cfg, tmp_path, cpu, False).bf16 is stated
    with pytest.raises(ConfigError, match="train.cpu_autocast is true but this run trains on cuda"):
        use_cpu_autocast(auto.train.model_copy(update={"cpu_autocast": True}), torch.device("cuda"))
    assert use_cpu_autocast(auto.train, torch.device("cuda")) is False
