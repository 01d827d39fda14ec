"""Long runs you can trust: each rule of a rerun through the real CLI — an operational edit resumes, an output edit is
refused with the folder untouched, `--force` really redoes, stated settings are required, failed synth requests are
retried, a killed merge leaves no half model, and a changed setting never reuses a cached answer."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ezo_in_process as ezo  # kills and a blocked import still run the real `ezo` process
from ezoforge.cli import app
from ezoforge.errors import ConfigError, RecordError
from ezoforge.infer.serve import BackgroundServer
from ezoforge.records import RECORD_FORMAT
from ezoforge.stage import Stage, input_fingerprints, lineage
from ezoforge.stages import load_recipe
from ezoforge.synth.run import run as synth_run
from ezoforge.train.progress import read_metrics
from test_synth_run import Script, pairs_of, write_docs
from trainkit import elyza_rows, overrides, tiny_model, train_until_killed  # noqa: F401  (fixtures)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under the folder with its content hash and mtime: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): f"{hashlib.sha256(p.read_bytes()).hexdigest()}:{p.stat().st_mtime_ns}"
            for p in sorted(folder.rglob("*")) if p.is_file()}


def sets(model: str, **train) -> list[str]:
    return [a for o in overrides(model, **train) for a in ("--set", o)]


# ---------------------------------------------------------------- the stage folder rules

def test_stage_refuses_other_output_settings_untouched_and_force_redoes(tmp_path):
    out = tmp_path / "stage"
    Stage("synth", out, {"synth": {"limit": 8}}).start()
    (out / "data").mkdir()
    (out / "data" / "part-00000.parquet").write_bytes(b"work")
    before = snapshot(out)
    with pytest.raises(ConfigError) as e:
        Stage("synth", out, {"synth": {"limit": 9}}).start()
    assert f"synth: {out} was partly made with other settings — synth.limit: 8 → 9" in str(e.value)
    assert "Nothing was changed" in str(e.value) and "--force" in str(e.value)
    assert snapshot(out) == before
    assert Stage("synth", out, {"synth": {"limit": 8}}).start() is None and snapshot(out) == before  # resumes
    Stage("synth", out, {"synth": {"limit": 9}}).start(force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_a_done_folder_is_redone_only_under_force(tmp_path):
    out = tmp_path / "stage"
    stage = Stage("curate", out, {"k": 1})
    stage.start()
    stage.finish({"docs": 3})
    assert Stage("curate", out, {"k": 1}).start() == {"docs": 3}
    assert Stage("curate", out, {"k": 1}).start(force=True) is None and not (out / "DONE").exists()


@pytest.mark.parametrize("stamp", [{}, {"format": RECORD_FORMAT + 1, "ezoforge": "9.0.0"}])
def test_a_folder_another_version_made_is_refused_plainly_and_force_redoes_it(tmp_path, stamp):
    out = tmp_path / "stage"
    stage = Stage("train", out, {"train": {"lr": 1}})
    stage.start()
    stage.finish({"steps": 1})
    done = {k: v for k, v in json.loads((out / "DONE").read_text()).items() if k not in ("format", "ezoforge")}
    (out / "DONE").write_text(json.dumps({**done, **stamp}))  # what another version records: no stamp, or its own
    (out / "adapter").mkdir()
    (out / "adapter" / "weights").write_text("w")
    before = snapshot(out)
    made = stamp.get("ezoforge", "an older version")
    for reader in (lambda: Stage("train", out, {"train": {"lr": 1}}).start(), lambda: lineage(out),
                   lambda: input_fingerprints([out])):
        with pytest.raises(RecordError, match=f"{out}: made by ezoforge {made}, which records its folders in "
                                              "another layout .*--force"):
            reader()
    assert snapshot(out) == before
    Stage("train", out, {"train": {"lr": 1}}).start(force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_a_folder_that_is_not_ours_is_never_cleared(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    for force in (False, True):
        with pytest.raises(ConfigError, match="not an ezoforge train folder"):
            Stage("train", out, {}).start(force=force)
    assert (out / "thesis.tex").read_text() == "years of work"


def test_a_start_that_wrote_only_its_config_does_not_block_the_corrected_command(tmp_path):
    out = tmp_path / "stage"
    Stage("train", out, {"lr": 1}).start()  # then failed before any output
    assert Stage("train", out, {"lr": 2}).start() is None


# ---------------------------------------------------------------- train through the CLI

def test_train_kill_then_output_edit_is_refused_and_operational_edit_resumes(tiny_model, elyza_rows, tmp_path):  # noqa: F811
    out = tmp_path / "train"
    settings = {"max_steps": 4, "save_every": 2}
    train_until_killed([str(elyza_rows), *sets(tiny_model, **settings)], out, step=2)
    before = snapshot(out)

    refused = ezo("train", str(elyza_rows), "--out", str(out), *sets(tiny_model, **settings, lora_r=8))
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "train.lora_r: 16 → 8" in refused.stderr and str(out) in refused.stderr and "train:" in refused.stderr
    assert snapshot(out) == before

    resumed = ezo("train", str(elyza_rows), "--out", str(out),
                  *sets(tiny_model, **{**settings, "save_every": 1, "log_every": 2, "keep_checkpoints": 1}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["resumed_from_step"] == 2 and stats["steps"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004"]  # the new keep_checkpoints
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


def test_force_retrains_from_step_zero(tiny_model, elyza_rows, tmp_path):  # noqa: F811
    out = tmp_path / "train"
    first = ezo("train", str(elyza_rows), "--out", str(out), *sets(tiny_model, max_steps=2, save_every=1))
    assert first.returncode == 0, first.stderr[-3000:]
    again = ezo("train", str(elyza_rows), "--out", str(out), *sets(tiny_model, max_steps=2, save_every=1))
    assert "already trained" in again.stderr
    forced = ezo("train", str(elyza_rows), "--out", str(out), "--force", *sets(tiny_model, max_steps=2, save_every=1))
    assert forced.returncode == 0, forced.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["resumed_from_step"] == 0 and stats["steps"] == 2
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1, 2]  # one run's log, not two


def test_stated_qlora_without_bitsandbytes_fails_before_any_model_loads(tiny_model, elyza_rows, tmp_path):  # noqa: F811
    blocker = tmp_path / "site" / "bitsandbytes"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('bitsandbytes is not installed here')\n")
    out = tmp_path / "train"
    flags_decide = [a for o in overrides(tiny_model) if o != "train.qlora=False" for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "ezoforge", "train", str(elyza_rows), "--out", str(out), "--qlora",
                           *flags_decide],
                          env={**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *sys.path])},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "train.qlora is true" in proc.stderr and "bitsandbytes is not installed here" in proc.stderr
    assert "Loading weights" not in proc.stderr and not out.exists()  # nothing loaded, no folder claimed


# ---------------------------------------------------------------- synth retries what failed

def test_synth_reports_failed_requests_and_a_rerun_resends_exactly_those(tmp_path):
    script = Script({"文書C": [("status", 400), ("ok",)]})
    docs = write_docs(tmp_path, ["文書A", "文書B", "文書C", "文書D"])
    out = tmp_path / "out"
    with BackgroundServer(script.app()) as url:
        recipe = load_recipe(None, ["synth.backend=openai", f"synth.base_url={url}/v1", "synth.model=scripted",
                                    "synth.max_retries=0", "synth.max_error_fraction=0.3"])
        first = synth_run(recipe, docs, out)
        assert first["errors"] == 1 and list(first["error_reasons"].values()) == [1]
        assert "400" in next(iter(first["error_reasons"])) and (out / "DONE").exists()
        assert {p["doc_id"] for p in pairs_of(out)} == {"文書A", "文書B", "文書D"}
        second = synth_run(recipe, docs, out)
        assert second["errors"] == 0 and second["requests_sent"] == 1
        assert dict(script.hits) == {"文書A": 1, "文書B": 1, "文書C": 2, "文書D": 1}
        assert {p["doc_id"] for p in pairs_of(out)} == {"文書A", "文書B", "文書C", "文書D"}  # the output rewritten
        assert synth_run(recipe, docs, out) == second  # no failures: a no-op
    assert sum(script.hits.values()) == 5


# ---------------------------------------------------------------- merge is complete or absent

def test_a_killed_merge_leaves_no_model_and_the_rerun_completes(tiny_model, elyza_rows, tmp_path):  # noqa: F811
    train = tmp_path / "train"
    assert ezo("train", str(elyza_rows), "--out", str(train), *sets(tiny_model, max_steps=1, save_every=1)).returncode == 0
    merged = tmp_path / "merged"
    partial = tmp_path / ".merged.partial"
    proc = subprocess.Popen([sys.executable, "-m", "ezoforge", "merge", str(train), "--out", str(merged)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(partial.glob("*.safetensors")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not merged.exists()  # whatever the kill interrupted, no folder under the final name
    rerun = ezo("merge", str(train), "--out", str(merged))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (merged / "DONE").exists() and not partial.exists()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(merged).config.num_hidden_layers == 2


# ---------------------------------------------------------------- caches and flags

def test_generate_partial_answers_are_reused_only_under_the_same_settings(bundled, tmp_path):
    from ezoforge.infer.generate import Generator, Sampling, generate_file

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}, ensure_ascii=False) + "\n"
                               for i, p in enumerate(["富士山の高さは？", "こんにちは"])), encoding="utf-8")
    out = tmp_path / "a.jsonl"
    partial = tmp_path / "a.jsonl.partial"
    partial.write_text(json.dumps({"id": "0", "key": "made-by-another-model", "answer": "STALE"}) + "\n")
    gen = Generator(bundled)
    generate_file(gen, prompts, out, None, Sampling(max_new_tokens=4), identity="model-a")
    answers = [json.loads(line)["answer"] for line in out.read_text().splitlines()]
    assert "STALE" not in answers and not partial.exists()


def test_a_flag_overrides_the_recipe_only_when_given(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"device": "cuda:7"}}))
    result = CliRunner().invoke(app, ["generate", "--config", str(recipe), "--prompt", "x"])
    assert "cuda:7" in str(result.exception)  # the recipe's device was used, not a silent "auto"


def test_ezo_run_force_names_known_stages():
    from ezoforge.pipeline import forced_steps

    plan = ["curate", "synth", "train", "merge", "eval-base", "eval-tuned"]
    assert forced_steps(plan, []) == set()
    assert forced_steps(plan, ["all"]) == set(plan)
    # eval-base reads train's folder for the base's revision: a redone train may have pinned another
    assert forced_steps(plan, ["merge", "train"]) == {"train", "merge", "eval-base", "eval-tuned"}
    assert forced_steps(plan, ["merge"]) == {"merge", "eval-tuned"}
    assert forced_steps(plan, ["synth"]) == {"synth", "train", "merge", "eval-base", "eval-tuned"}
    assert forced_steps(plan, ["eval"]) == {"eval-base", "eval-tuned"}
    with pytest.raises(ConfigError, match="--force trian: not a stage"):
        forced_steps(plan, ["trian"])


def test_bare_force_means_every_stage():
    from ezoforge.cli import _force_takes_optional_stage

    assert _force_takes_optional_stage(["run", "r.yaml", "--force"]) == ["run", "r.yaml", "--force=all"]
    assert _force_takes_optional_stage(["run", "--force", "r.yaml"]) == ["run", "--force=all", "r.yaml"]
    assert _force_takes_optional_stage(["run", "r.yaml", "--force", "train"]) == ["run", "r.yaml", "--force", "train"]
    assert _force_takes_optional_stage(["train", "x", "--force"]) == ["train", "x", "--force"]
