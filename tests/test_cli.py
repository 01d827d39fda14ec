import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import BUNDLED, ezo_in_process
from ezoforge.cli import app
from ezoforge.errors import ConfigError

runner = CliRunner()


def test_help_lists_every_command():
    out = runner.invoke(app, ["--help"]).output
    for command in ("generate", "chat", "serve", "run", "validate"):
        assert command in out


def test_validate_prints_resolved_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("workdir: runs/x\ntrain:\n  lora_r: 8\n", encoding="utf-8")
    result = runner.invoke(app, ["validate", str(recipe), "--set", "train.max_steps=3"])
    assert result.exit_code == 0
    assert "lora_r: 8" in result.output and "max_steps: 3" in result.output


def test_validate_rejects_unknown_key_by_name(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lora_rank: 8\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "ezoforge", "validate", str(recipe)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "r.yaml:2: train.lora_rank: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_generate_prints_a_reply(bundled):
    result = runner.invoke(app, ["generate", "--model", BUNDLED, "--prompt", "日本の首都はどこですか？",
                                 "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["chat"], ["serve", "--port", "1"]])
def test_system_flags_that_contradict(command):
    result = runner.invoke(app, [*command, "--model", BUNDLED, "--system", "s", "--no-system"])
    assert isinstance(result.exception, ConfigError)  # `ezo` prints it and exits 2
    assert str(result.exception) == "--system and --no-system contradict each other"
    assert "loaded" not in result.output  # refused before the model loads


def test_version_and_a_stdout_that_holds_only_answers(bundled, tmp_path):
    """`ezo --version`; progress bars and log lines go to stderr (one console), so stdout can be piped."""
    from importlib.metadata import version

    shown = ezo_in_process("--version")
    assert shown.returncode == 0 and shown.stdout == f"ezoforge {version('ezoforge')}\n"
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"id": "a", "prompt": "日本の首都は？"}\n', encoding="utf-8")
    result = ezo_in_process("generate", "--model", BUNDLED, "--input", prompts, "--out", tmp_path / "out.jsonl",
                            "--max-new-tokens", "4")
    assert result.returncode == 0 and result.stdout == "" and "wrote 1 answers" in result.stderr
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8").count("\n") == 1
