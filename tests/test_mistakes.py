"""Every common mistake through the CLI: a clear message naming the value and where it came from, a non-zero
exit, no traceback, fast (before any model loads), and nothing claimed or lost on disk.

The commands run in this process (conftest.ezo_in_process); the last test runs the real `ezo` process to check its
exit codes and that no traceback reaches the terminal."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from conftest import BUNDLED
from conftest import ezo_in_process as ezo
from ezoforge.infer.serve import BackgroundServer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"
WEB = ROOT / "src/ezoforge/data/web/fineweb-demo.parquet"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def ezo_process(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ezoforge", *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=300)


def failed(proc: subprocess.CompletedProcess, *words, code=None) -> str:
    """The command failed cleanly and its message holds each word; returns the message."""
    text = " ".join(proc.stderr.split())  # rich wraps long lines
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert code is None or proc.returncode == code, (proc.returncode, text)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Loading weights" not in proc.stderr and "loaded " not in proc.stderr  # failed before any model loaded
    for word in words:
        assert word in text, (word, text)
    return text


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


ENGLISH = ("The quick brown fox jumps over the lazy dog near the river bank every single morning. " * 12).strip()


def test_output_that_is_a_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    failed(ezo("curate", WEB, "--out", target),
           "notes.txt", "exists and is not a folder", code=2)
    assert target.read_text() == "mine"


def test_workdir_that_is_a_file(tmp_path):
    (tmp_path / "runs").write_text("a file")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"workdir: {tmp_path / 'runs'}\nstages: [curate]\n")
    failed(ezo("run", recipe), "workdir", "is not a folder")


def test_a_gguf_that_is_not_one(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    failed(ezo("generate", "-m", fake, "--prompt", "x"), "fake.gguf", "not a GGUF file")


def test_missing_chat_template_claims_no_folder(tmp_path):
    rows = write_jsonl(tmp_path / "pairs.jsonl", [{"instruction": "質問", "response": "答え"}])
    out = tmp_path / "train"
    failed(ezo("train", rows, "--out", out, "--model", BUNDLED, "--chat-template", tmp_path / "nope.jinja"),
           "nope.jinja", "no such file")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_on_a_cpu_torch():
    failed(ezo("generate", "--model", BUNDLED, "--device", "cuda", "--prompt", "x"), "'cuda'", "no CUDA")


def test_unknown_device():
    failed(ezo("generate", "--model", BUNDLED, "--device", "tpu9", "--prompt", "x"), "tpu9")


def test_all_responses_empty_is_not_a_success(tmp_path):
    rows = write_jsonl(tmp_path / "pairs.jsonl", [{"instruction": f"質問{i}", "response": ""} for i in range(5)])
    out = tmp_path / "train"
    failed(ezo("train", rows, "--out", out, "--model", BUNDLED, "--no-qlora", "--max-steps", "1"),
           "all 5 responses are empty")
    assert not out.exists()  # the failed start left nothing to block the corrected command


def test_synth_of_english_documents_fails_and_says_why(tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"id": f"en{i}", "text": ENGLISH} for i in range(2)])
    app = FastAPI()
    app.get("/health")(lambda: {"status": "ok"})

    @app.post("/v1/chat/completions")
    async def english(body: dict):
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "Q1: What is it?\nA1: A fox."}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    out = tmp_path / "synth"
    with BackgroundServer(app) as url:
        args = ["synth", docs, "--out", out, "--backend", "openai", "--base-url", f"{url}/v1", "--model", "m"]
        failed(ezo(*args), "0 pairs from 2 documents", "0 of 2 documents are Japanese", "--allow-empty")
        assert not (out / "DONE").exists()
        allowed = ezo(*args, "--allow-empty")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert json.loads((out / "stats.json").read_text())["pairs"] == 0


def test_curate_that_keeps_nothing(tmp_path):
    docs = write_jsonl(tmp_path / "en.jsonl", [{"id": f"en{i}", "text": ENGLISH} for i in range(3)])
    out = tmp_path / "curate"
    failed(ezo("curate", docs, "--out", out), "0 of 3 documents kept", "not_japanese 3")
    assert not (out / "DONE").exists()


@pytest.mark.parametrize("override, words", [
    ("train.max_steps=abc", ["--set train.max_steps=abc", "train.max_steps", "valid integer"]),
    ("trian.max_steps=3", ["--set trian.max_steps=3", "trian: unknown key"]),
    ("train.qlora=maybe", ["--set train.qlora=maybe", "train.qlora"]),
    ("train.max_steps", ["--set 'train.max_steps'", "KEY=VALUE"]),
])
def test_a_bad_override_is_blamed_on_itself(override, words):
    text = failed(ezo("validate", DEMO, "--set", override), *words, code=2)
    assert "demo.yaml:" not in text


def test_a_bad_flag_is_named_as_a_flag(tmp_path):
    failed(ezo("curate", WEB, "--out", tmp_path / "c",
               "--on-error", "maybe"), "flag --on-error", "curate.on_error")


def test_duplicate_sections_name_both_lines(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lora_r: 8\nsynth:\n  limit: 2\ntrain:\n  lora_r: 4\n")
    failed(ezo("validate", recipe), "r.yaml:5", "duplicate key 'train'", "first at line 1", code=2)


def test_output_inside_the_input_is_refused(tmp_path):
    first = tmp_path / "c"
    assert ezo("curate", WEB, "--out", first).returncode == 0
    before = sorted(p.name for p in (first / "data").iterdir())
    failed(ezo("curate", first, "--out", first / "data"), "overlap")
    failed(ezo("curate", first, "--out", first / "again"), "overlap")
    assert sorted(p.name for p in (first / "data").iterdir()) == before


def test_a_stage_folder_as_input_is_read_through_its_data_only(tmp_path):
    first, second = tmp_path / "c", tmp_path / "c2"
    assert ezo("curate", WEB, "--out", first).returncode == 0
    assert ezo("curate", first, "--out", second).returncode == 0
    a = json.loads((first / "stats.json").read_text())
    b = json.loads((second / "stats.json").read_text())
    assert b["docs_in"] == a["docs_out"]  # not its rejected/ shards too


def test_hub_id_offline_says_what_to_do():
    failed(ezo("generate", "--model", "nobody/no-such-model", "--prompt", "x"), "nobody/no-such-model",
           "HF_HUB_OFFLINE", "local model folder")


def test_adapter_that_is_not_one(tmp_path):
    failed(ezo("generate", "--model", BUNDLED, "--adapter", tmp_path, "--prompt", "x"), "not a PEFT adapter folder")


def test_busy_port_fails_before_the_model_loads():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        failed(ezo("serve", "--model", BUNDLED, "--port", port), f"--port {port}", "cannot listen")


def test_unknown_stage_to_force(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"workdir: {tmp_path / 'w'}\n")
    failed(ezo("run", recipe, "--force", "trian"), "--force trian: not a stage")


def test_stated_liger_without_it(tmp_path):
    rows = write_jsonl(tmp_path / "pairs.jsonl", [{"instruction": "質問", "response": "答え"}])
    failed(ezo("train", rows, "--out", tmp_path / "t", "--model", BUNDLED, "--set", "train.liger=true"),
           "train.liger is true")
    assert not (tmp_path / "t").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_stated_static_cache_on_a_cpu_loses_nothing_even_forced(tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"id": "1", "text": "富士山は日本一高い山である。"}])
    out = tmp_path / "synth"
    out.mkdir()
    (out / "pairs-00000.parquet").write_bytes(b"earlier work")
    (out / "DONE").write_text('{"fingerprint": "older settings", "stage": "synth"}')
    failed(ezo("synth", docs, "--out", out, "--set", "synth.backend=transformers", "--set", "synth.static_cache=true",
               "--force"),
           "synth.static_cache is true", "needs CUDA", code=2)
    assert (out / "pairs-00000.parquet").read_bytes() == b"earlier work"


def test_static_cache_with_a_server_backend():
    failed(ezo("validate", DEMO, "--set", "synth.backend=vllm", "--set", "synth.static_cache=true"),
           "synth: ", "static_cache is a transformers-backend setting", "backend 'vllm'", code=2)


def test_the_ezo_command_exits_with_the_errors_code_and_no_traceback(tmp_path):
    """What the in-process runs above stand for: `ezo` itself maps a ConfigError to 2 and another EzoError to 1, and
    prints the message without a traceback."""
    docs = write_jsonl(tmp_path / "en.jsonl", [{"id": f"en{i}", "text": ENGLISH} for i in range(3)])
    for args, code, words in [
        (["validate", DEMO, "--set", "trian.max_steps=3"], 2, ["error:", "--set trian.max_steps=3", "trian: unknown key"]),
        (["curate", docs, "--out", tmp_path / "c"], 1, ["error:", "0 of 3 documents kept", "not_japanese 3"]),
    ]:
        failed(ezo_process(*args), *words, code=code)
