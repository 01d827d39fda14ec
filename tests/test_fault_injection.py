"""SIGKILL inside each stage's real work, at points the test finds in the stage's own outputs as they appear (files,
rows, checkpoints), then the same command again: the folder is never marked done by the killed run, nothing of it
goes on writing, and the rerun's result equals an uninterrupted run's. Also a judge that drops mid-eval and returns.

Train's kill-and-resume (identical losses) is tests/test_train_run.py's and test_reruns.py's; these are the other
stages, run by `make test-all` (`-m slow`)."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import BUNDLED, DEMO, REPO, ezo_in_process
from scripted_judge import ScriptedJudge, judge_and_synthesizer
from trainkit import tensors

pytestmark = pytest.mark.slow


def group_alive(pgid: int) -> list[int]:
    alive = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """Every file of the stage's folder and its hidden siblings (an atomic stage's `.NAME.partial`)."""
    files = {}
    for root in [out, *out.parent.glob(f".{out.name}*")]:
        for f in ([root] if root.is_file() else root.rglob("*")):
            if f.is_file():
                st = f.stat()
                files[str(f)] = (st.st_size, st.st_mtime_ns)
    return files


def kill_at(args: list, out: Path, point, log: Path) -> None:
    """`ezo ARGS` as a real process in a group of its own, killed (the whole group, SIGKILL) once `point()` holds.
    Then: no process of it is left, its files stop changing, and its folder is not marked done."""
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "ezoforge", *map(str, args)], cwd=REPO, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not point():
            assert proc.poll() is None, f"ended before the kill point: {log.read_text()[-3000:]}"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 10
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group_alive(proc.pid)
    before = snapshot(out)
    time.sleep(0.5)
    assert snapshot(out) == before, "something went on writing after the kill"
    assert not (out / "DONE").exists()


def rows(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    except sqlite3.Error:
        return 0


def completions(out: Path, step: str) -> int:
    folder = out / ".work" / "logs" / step / "completions"
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def curated(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [r for f in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def figures(stats: dict) -> dict:
    """stats.json without what differs between any two runs (times, rates)."""
    return {k: v for k, v in stats.items() if not any(t in k for t in ("seconds", "per_s", "elapsed", "time"))}


# ---------------------------------------------------------------- curate: each datatrove pass


@pytest.fixture(scope="module")
def curate_whole(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("curate") / "whole"
    assert ezo_in_process("curate", "-c", DEMO, "--out", out).returncode == 0
    return out


@pytest.mark.parametrize("step", ["filter", "buckets", "cluster", "dedup"])
def test_curate_killed_in_each_pass_resumes_to_the_same_documents(curate_whole, tmp_path, step):
    out = tmp_path / "curate"
    kill_at(["curate", "-c", DEMO, "--out", out], out, lambda: completions(out, step) >= 1, tmp_path / "log")
    result = ezo_in_process("curate", "-c", DEMO, "--out", out)
    assert result.returncode == 0, result.stderr
    assert curated(out) == curated(curate_whole)
    assert figures(json.loads((out / "stats.json").read_text())) == \
        figures(json.loads((curate_whole / "stats.json").read_text()))


# ---------------------------------------------------------------- synth: after its first and half its requests


@pytest.fixture(scope="module")
def paced_synthesizer():
    """The scripted synthesizer, a tenth of a second per reply: the stage is surely mid-work at each kill point."""
    def paced(messages):
        time.sleep(0.1)
        return judge_and_synthesizer(messages)

    with ScriptedJudge(paced) as server:
        yield server


def synth_args(curated_dir: Path, url: str, out: Path) -> list:
    return ["synth", curated_dir, "--out", out, "-c", DEMO, "--set", "synth.backend=openai", "--set",
            f"synth.base_url={url}", "--set", f"synth.model={BUNDLED}", "--set", "synth.limit=12", "--set",
            "synth.concurrency=1", "--set", "synth.pairs_per_doc=1"]


def pairs(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    files = sorted((out / "data").rglob("*.parquet"))
    if files:
        return [r for f in files for r in pq.read_table(f).to_pylist()]
    return [json.loads(line) for f in sorted((out / "data").rglob("*.jsonl")) for line in f.open(encoding="utf-8")]


@pytest.mark.parametrize("after", ["first", "half"])
def test_synth_killed_mid_requests_resumes_to_the_same_pairs(curate_whole, paced_synthesizer, tmp_path, after):
    whole = tmp_path / "whole"
    assert ezo_in_process(*synth_args(curate_whole, paced_synthesizer.url, whole)).returncode == 0
    total = rows(whole / "requests.sqlite")
    out = tmp_path / "synth"
    at = 1 if after == "first" else total // 2
    kill_at(synth_args(curate_whole, paced_synthesizer.url, out), out, lambda: rows(out / "requests.sqlite") >= at,
            tmp_path / "log")
    kept = rows(out / "requests.sqlite")
    sent = len(paced_synthesizer.requests)
    assert ezo_in_process(*synth_args(curate_whole, paced_synthesizer.url, out)).returncode == 0
    assert len(paced_synthesizer.requests) - sent == total - kept  # no stored request is sent again
    assert pairs(out) == pairs(whole)


# ---------------------------------------------------------------- merge: after its first and half its shards


@pytest.fixture(scope="module")
def sharded_train(tmp_path_factory) -> Path:
    """A 16-layer Llama in 8 MB shards with a LoRA adapter on every linear layer, as a finished train folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from test_merge import make_train_folder
    from trainkit import make_tiny_llama

    root = tmp_path_factory.mktemp("merge")
    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=16,
                      num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "base", max_shard_size="8MB")
    AutoTokenizer.from_pretrained(make_tiny_llama(root / "tokenizer")).save_pretrained(root / "base")
    return make_train_folder(str(root / "base"), root / "train", r=4, target_modules="all-linear")


@pytest.mark.parametrize("after", ["first", "half"])
def test_merge_killed_mid_shards_leaves_no_model_and_resumes_to_the_same_weights(sharded_train, tmp_path, after):
    import torch

    whole = tmp_path / "whole"
    assert ezo_in_process("merge", sharded_train, "--out", whole, "--dtype", "fp32").returncode == 0
    shards = len(list(whole.glob("*.safetensors")))
    out = tmp_path / "merged"
    partial = tmp_path / f".{out.name}.partial"
    at = 1 if after == "first" else max(2, shards // 2)
    kill_at(["merge", sharded_train, "--out", out, "--dtype", "fp32"], out,
            lambda: len(list(partial.glob("*.safetensors"))) >= at, tmp_path / "log")
    assert not out.exists()  # atomic: the merged folder is whole or absent
    assert ezo_in_process("merge", sharded_train, "--out", out, "--dtype", "fp32").returncode == 0
    mine, theirs = tensors(out), tensors(whole)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


# ---------------------------------------------------------------- eval: mid-answers and mid-verdicts; a judge that drops


def eval_args(out: Path, url: str, cache: Path) -> list:
    return ["eval", "--model", BUNDLED, "--tasks", "elyza100:bundled:tasks/demo-tasks.jsonl,ppl:bundled:heldout/heldout-ja.jsonl",
            "--out", out, "--judge-url", url, "--judge-model", "scripted",
            "--set", "eval.limit=4", "--set", "eval.generation.max_new_tokens=32", "--set", f"eval.cache={cache}",
            "--set", "eval.judge_max_retries=0"]


def report_figures(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    answers = [json.loads(line) for line in (out / "answers.jsonl").open(encoding="utf-8")]
    return {"grades": report.get("mean_grade"), "ppl": report.get("perplexity"), "answers": answers}


@pytest.fixture(scope="module")
def eval_whole(paced_synthesizer, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    assert ezo_in_process(*eval_args(root / "whole", paced_synthesizer.url, root / "cache.sqlite")).returncode == 0
    return root / "whole"


@pytest.mark.parametrize("after", ["answers", "verdicts"])
def test_eval_killed_mid_work_resumes_to_the_same_report(paced_synthesizer, eval_whole, tmp_path, after):
    out, cache = tmp_path / "eval", tmp_path / "cache.sqlite"
    sent = len(paced_synthesizer.requests)
    # Answers are stored first (one per task), then verdicts: one stored row is an answer, a judge request a verdict.
    point = (lambda: rows(cache) >= 1) if after == "answers" else (lambda: len(paced_synthesizer.requests) > sent)
    kill_at(eval_args(out, paced_synthesizer.url, cache), out, point, tmp_path / "log")
    result = ezo_in_process(*eval_args(out, paced_synthesizer.url, cache))
    assert result.returncode == 0, result.stderr
    assert report_figures(out) == report_figures(eval_whole)


def test_a_judge_that_drops_mid_eval_fails_the_eval_keeps_its_work_and_the_rerun_completes(eval_whole, tmp_path):
    out, cache = tmp_path / "eval", tmp_path / "cache.sqlite"
    dropped = threading.Event()

    def reply_once_gone(messages):  # the first verdict is given once the server has stopped listening
        dropped.wait(30)
        return judge_and_synthesizer(messages)

    judge = ScriptedJudge(reply_once_gone)
    port = judge.server.server_port
    with judge:
        def drop() -> None:
            while not judge.requests:
                time.sleep(0.01)
            judge.server.shutdown()
            judge.server.server_close()
            dropped.set()

        threading.Thread(target=drop, daemon=True).start()
        failed = ezo_in_process(*eval_args(out, judge.url, cache), "--set", "eval.concurrency=1")
    assert failed.returncode != 0 and "internal error" not in failed.stderr
    assert not (out / "DONE").exists()
    stored = rows(cache)
    assert stored >= 1
    back = ScriptedJudge(judge_and_synthesizer)
    back.server.server_close()
    back.server = type(back.server)(("127.0.0.1", port), back.server.RequestHandlerClass)
    with back:  # the judge returns, at the same address
        result = ezo_in_process(*eval_args(out, judge.url, cache))
    assert result.returncode == 0, result.stderr
    assert report_figures(out) == report_figures(eval_whole)
    assert len(back.requests) < 4  # what was stored is not asked again


# ---------------------------------------------------------------- export: mid-copy, mid-GGUF


@pytest.mark.parametrize("after", ["weights", "gguf"])
def test_export_killed_mid_work_leaves_no_folder_and_resumes_to_the_same_files(sharded_train, tmp_path, after):
    import hashlib

    merged = tmp_path / "merged"
    assert ezo_in_process("merge", sharded_train, "--out", merged, "--dtype", "fp32").returncode == 0
    args = lambda out: ["export", merged, "--out", out, "--gguf", "f16"]  # noqa: E731
    assert ezo_in_process(*args(tmp_path / "whole")).returncode == 0
    out = tmp_path / "export"
    partial = tmp_path / f".{out.name}.partial"
    pattern = "*.safetensors" if after == "weights" else "gguf/*.gguf*"
    kill_at(args(out), out, lambda: any(partial.glob(pattern)), tmp_path / "log")
    assert not out.exists()
    assert ezo_in_process(*args(out)).returncode == 0

    def digests(folder: Path) -> dict:
        return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.rglob("*")
                if f.is_file() and f.name not in ("DONE", "stats.json", "config.yaml")}

    assert digests(out).keys() == digests(tmp_path / "whole").keys()
    differing = {k for k, v in digests(out).items() if digests(tmp_path / "whole")[k] != v}
    assert differing <= {"README.md"}, differing  # the card names its own folder
