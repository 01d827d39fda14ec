import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ezoforge.errors import ConfigError
from ezoforge.stages import load_recipe
from ezoforge.train import run as train_run
from ezoforge.train.progress import read_metrics
from trainkit import elyza_rows, overrides, passage_pairs, tiny_model, train_until_killed  # noqa: F401  (fixtures)

SETTINGS = {"max_steps": 6, "save_every": 2, "eval_every": 2, "keep_checkpoints": 2}
FSDP_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "accelerate-fsdp-qlora.yaml"


@pytest.fixture(scope="module")
def trained(tiny_model, elyza_rows, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("train") / "run"
    return out, train_run.run(load_recipe(None, overrides(tiny_model, **SETTINGS)), [elyza_rows], out)


def test_outputs_metrics_and_checkpoints(trained):
    out, stats = trained
    for key in ("steps", "train_loss_first", "train_loss_last", "eval_loss_start", "eval_loss", "tokens_per_s",
                "packing_efficiency", "qlora", "seconds"):
        assert stats[key] is not None, key
    assert stats["steps"] == 6 and stats["qlora"] is False
    # What computed it, read off the model: TRL's fused LM head (torch tiles here: no Triton without CUDA), SDPA
    assert stats["kernels"] == {"attention": "sdpa", "fused_lm_head": True, "liger_modules": 0,
                                "linear4bit_modules": 0, "triton_kernels": []}
    assert stats["train_loss_last"] < stats["train_loss_first"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 0, "eval_loss": stats["eval_loss_start"]}  # the untrained model
    assert [r["step"] for r in rows[1:]] == [1, 2, 3, 4, 5, 6]
    for r in rows[1:]:
        assert isinstance(r["loss"], float) and r["lr"] is not None and r["tokens_per_s"] > 0
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4, 6]
    assert rows[-1]["eval_loss"] == stats["eval_loss"] < stats["eval_loss_start"]
    lrs = [r["lr"] for r in rows[1:]]
    assert lrs[0] < max(lrs) == pytest.approx(5e-3) and lrs[-1] < max(lrs)  # warm-up, then cosine decay
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-000004", "step-000006"]  # the last two, nothing staged left behind
    ckpt = out / "checkpoints" / "step-000006"
    for name in ("COMPLETE", "ezo-checkpoint.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                 "rng_state.pth", "trainer_state.json"):
        assert (ckpt / name).exists(), name
    info = json.loads((ckpt / "ezo-checkpoint.json").read_text())
    assert info["step"] == 6 and info["data_position"]["rows_seen"] == 6 and info["settings"]["output"]["train"]["seed"] == 0
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "DONE").read_text())["stats"]["steps"] == 6


def test_the_loss_falls_on_a_passage_trained_as_one_conversation(tiny_model, passage_pairs, tmp_path):  # noqa: F811
    from ezoforge.records import read_rows, write_jsonl

    rows = [row for _, row in read_rows(passage_pairs / "data" / "part-00000.parquet")]
    shortest = min((row["context"] for row in rows if row["context"]), key=len)
    one = tmp_path / "one-passage.jsonl"  # one conversation, so both steps learn the same row
    write_jsonl(one, [row for row in rows if row["context"] == shortest])
    recipe = load_recipe(None, overrides(tiny_model, max_length=2048, max_steps=2, save_every=2, eval_fraction=0.0,
                                         warmup_ratio=0.0))
    assert recipe.train.group_pairs == "passage"  # the default
    stats = train_run.run(recipe, [one], tmp_path / "run")
    assert (stats["examples"], stats["pairs"], stats["truncated"]) == (1, 5, 0)
    assert stats["train_loss_last"] < stats["train_loss_first"]


def test_adapter_loads_with_peft_and_changes_the_model(trained, tiny_model):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = trained
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert {m.split(".")[-1] for m in config["target_modules"]} == {  # every linear layer but the LM head
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = base(input_ids=x).logits
        after = PeftModel.from_pretrained(base, out / "adapter")(input_ids=x).logits
    assert (after - before).abs().max() > 1e-3


def test_rerun_is_a_no_op_and_other_settings_are_refused(trained, tiny_model, elyza_rows):  # noqa: F811
    out, stats = trained
    same = load_recipe(None, overrides(tiny_model, **SETTINGS))
    assert train_run.run(same, [elyza_rows], out) == stats
    other = load_recipe(None, overrides(tiny_model, **SETTINGS, learning_rate=1e-3))
    with pytest.raises(ConfigError, match="train.learning_rate: 0.005 → 0.001"):
        train_run.run(other, [elyza_rows], out)


def test_a_checkpoint_from_other_settings_is_refused(trained, tiny_model, elyza_rows, tmp_path):  # noqa: F811
    out, _ = trained
    target = tmp_path / "copy"
    shutil.copytree(out / "checkpoints", target / "checkpoints")
    recipe = load_recipe(None, overrides(tiny_model, **SETTINGS, lora_r=8))
    # A folder whose saved settings (edited by hand) no longer say what made its checkpoints.
    (target / "config.yaml").write_text(yaml.safe_dump(train_run.train_stage(recipe, [elyza_rows], target).settings))
    with pytest.raises(ConfigError, match=r"step-000006 was written with other settings \(differ: train.lora_r\)"):
        train_run.run(recipe, [elyza_rows], target)


def test_resume_after_a_kill_matches_an_uninterrupted_run(trained, tiny_model, elyza_rows, tmp_path):  # noqa: F811
    straight, _ = trained
    killed = tmp_path / "killed"
    train_until_killed([str(elyza_rows), *(a for o in overrides(tiny_model, **SETTINGS) for a in ("--set", o))],
                       killed, step=2)
    stats = train_run.run(load_recipe(None, overrides(tiny_model, **SETTINGS)), [elyza_rows], killed)
    assert 2 <= stats["resumed_from_step"] < 6 and stats["steps"] == 6
    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(0, 7))
    for ra, rb in zip(a, b):
        assert rb.get("loss") == pytest.approx(ra.get("loss"), abs=1e-5), (ra, rb)
        assert rb.get("eval_loss") == pytest.approx(ra.get("eval_loss"), abs=1e-5)
    assert stats["train_loss_last"] == pytest.approx(trained[1]["train_loss_last"], abs=1e-5)


def _lora_grads(model, batch):
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_4bit_lora_gradients_survive_an_eval_forward_on_cpu(tiny_model):  # noqa: F811
    from peft import get_peft_model

    from ezoforge.train.model import four_bit_problem, load_base, lora_config
    from ezoforge.train.settings import TrainConfig

    cpu = torch.device("cpu")
    if four_bit_problem(cpu):
        pytest.skip(f"bitsandbytes 4-bit does not train on this CPU: {four_bit_problem(cpu)}")
    cfg = TrainConfig(lora_dropout=0.0)
    base = load_base(tiny_model, cfg, cpu, qlora=True)
    model = get_peft_model(base, lora_config(cfg, base))
    assert "Linear4bit" in {type(m).__name__ for m in model.modules()}
    x = torch.randint(0, 1000, (2, 24))
    batch = {"input_ids": x, "labels": x}
    model.train()
    before = _lora_grads(model, batch)
    model.eval()
    with torch.no_grad():
        model(input_ids=x)  # what Trainer eval and generate do; bitsandbytes may repack weights here
    model.train()
    after = _lora_grads(model, batch)
    assert before and sum(g.abs().sum() for g in before.values()) > 0
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, msg=name)


def _qlora_run(model, rows, out, device_sets=()):
    recipe = load_recipe(None, overrides(model, qlora=True, max_steps=2, save_every=2) + list(device_sets))
    return train_run.run(recipe, [rows], out)


def test_qlora_trains_on_cpu_when_bitsandbytes_can(tiny_model, elyza_rows, tmp_path):  # noqa: F811
    from ezoforge.train.model import four_bit_problem

    if four_bit_problem(torch.device("cpu")):
        pytest.skip(f"bitsandbytes 4-bit does not train on this CPU: {four_bit_problem(torch.device('cpu'))}")
    stats = _qlora_run(tiny_model, elyza_rows, tmp_path / "q")
    assert stats["qlora"] is True and stats["kernels"]["linear4bit_modules"] == 2 * 7  # q k v o gate up down
    assert stats["steps"] == 2 and stats["train_loss_last"] > 0 and (tmp_path / "q" / "adapter").is_dir()


@pytest.mark.gpu
def test_qlora_on_cuda(tiny_model, elyza_rows, tmp_path):  # noqa: F811
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    stats = _qlora_run(tiny_model, elyza_rows, tmp_path / "q", ["model.device=cuda"])
    assert stats["qlora"] is True and stats["device"].startswith("cuda") and stats["tokens_per_s"] > 0


def test_fsdp_recipe_configures_accelerate_for_qlora():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(FSDP_RECIPE), "-m", "ezoforge", "train"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true" and env["FSDP_USE_ORIG_PARAMS"] == "false"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"


@pytest.mark.slow  # a real `accelerate launch` process (~16 s here); `make test-all`
def test_accelerate_launch_runs_ezo_train(tiny_model, elyza_rows, tmp_path):  # noqa: F811
    """The multi-GPU entry point as far as a CPU goes: `accelerate launch -m ezoforge train` with the shipped config."""
    out = tmp_path / "launched"
    sets = [a for o in overrides(tiny_model, max_steps=1, save_every=1) for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_RECIPE),
                           "--cpu", "-m", "ezoforge", "train", str(elyza_rows), "--out", str(out), *sets],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "DONE").exists() and (out / "adapter" / "adapter_model.safetensors").exists()


def test_qlora_true_is_4bit_or_an_error_and_auto_says_what_it_picked(caplog):
    from ezoforge.train.model import use_qlora
    from ezoforge.train.settings import TrainConfig

    with pytest.raises(ConfigError, match="train.qlora is true but 4-bit NF4 cannot train on meta"):
        use_qlora(TrainConfig(qlora=True), torch.device("meta"))  # bitsandbytes cannot run there
    with caplog.at_level("INFO"):
        assert use_qlora(TrainConfig(), torch.device("cpu")) is False  # auto on a CPU: LoRA, and the log says why
    assert "train.qlora=auto: LoRA" in caplog.text and "as long" in caplog.text
    assert use_qlora(TrainConfig(qlora=False), torch.device("cpu")) is False
