"""A new synth/eval backend is its module and one line in `config.BACKENDS`: the recipe takes its name, `ezo plan`
plans it by what its class declares, and synth answers through it (`tests/canned_backend.py`)."""
import json
from pathlib import Path

import pytest

from canned_backend import REPLY, TOKENS_PER_S, CannedBackend
from ezoforge.completion import Engine
from ezoforge.config import BACKENDS, bundled_data
from ezoforge.errors import ConfigError
from ezoforge.plan import plan
from ezoforge.records import read_rows
from ezoforge.stages import load_recipe
from ezoforge.synth.run import run

RECIPE_8B = Path(__file__).resolve().parents[1] / "recipes" / "llama31-8b.yaml"
SERVED_JUDGE = ["eval.judge_url=http://127.0.0.1:9/v1", "eval.judge_model=judge", "eval.tasks=[elyza100]"]


@pytest.fixture
def canned(monkeypatch):
    monkeypatch.setitem(BACKENDS, "canned", "canned_backend:CannedBackend")  # the one registry line


def test_without_its_line_the_name_is_refused():
    with pytest.raises(ConfigError, match="synth.backend: .*unknown backend 'canned'"):
        load_recipe(None, ["synth.backend=canned"])


def test_ezo_plan_plans_a_new_backend_by_its_estimate(canned):
    out = plan(load_recipe(RECIPE_8B, ["synth.backend=canned", "eval.backend=canned", *SERVED_JUDGE]), "h100")
    synth, answers = out["stages"]["synth"], out["stages"]["eval-base"]
    assert out["sources"]["synth"] == f"model: canned replies: no model, {TOKENS_PER_S:,.0f} tokens/s"
    assert (synth["gpu_gib"], synth["ram_gib"], synth["tokens_per_s"]) == (0.0, 0.5, TOKENS_PER_S)
    assert synth["hours"] > out["tokens"]["synth_out"] / TOKENS_PER_S / 3600  # decoding, then its prefill
    # eval: nothing loads here (a served backend, a served judge, no likelihood task); hours at its rate
    assert (answers["gpu_gib"], answers["tokens_per_s"]) == (0.0, TOKENS_PER_S)
    evals = [name for name in out["stages"] if name.startswith("eval-")]
    per_eval = out["tokens"]["eval_out"] / len(evals)
    assert answers["hours"] == pytest.approx(per_eval / TOKENS_PER_S / 3600, abs=0.005)  # hours: 2 decimals
    assert out["sources"]["eval"].startswith("model: answers: canned replies")


def test_synth_answers_through_a_new_backend(canned, tmp_path):
    rows = Path(bundled_data("bundled:heldout/heldout-ja.jsonl")).read_text(encoding="utf-8").splitlines()[:2]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(rows) + "\n", encoding="utf-8")
    stats = run(load_recipe(None, ["synth.backend=canned", "synth.pairs_per_doc=2"]), docs, tmp_path / "synth")
    pairs = [row for f in sorted((tmp_path / "synth" / "data").glob("*.parquet")) for _, row in read_rows(f)]
    assert stats["documents"] == 2 and stats["pairs"] == len(pairs) >= 2
    assert {p["instruction"] for p in pairs} >= {"それは何ですか。"}
    assert REPLY not in {p["response"] for p in pairs}  # synth's requests carry the prefill: the pair form answers
    assert json.loads((tmp_path / "synth" / "stats.json").read_text())["pairs"] == stats["pairs"]


def test_every_way_of_answering_is_one_engine(canned, bundled, tmp_path):
    """Backends and local engines share one protocol (completion.Engine), so any consumer of `complete` takes either:
    `ezo generate`'s batch path answers through a synth/eval backend as through the bundled model."""
    from ezoforge.infer.backends import OpenAIBackend
    from ezoforge.infer.generate import Generator, Sampling, generate_file

    engines = [Generator(bundled), CannedBackend(),
               OpenAIBackend("http://127.0.0.1:9/v1", "m", None, 1.0, 0, 1, None, 4096)]
    assert all(isinstance(e, Engine) for e in engines)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "こんにちは"}\n', encoding="utf-8")
    for engine, expected in ((CannedBackend(), REPLY), (engines[0], None)):
        out = tmp_path / f"{type(engine).__name__}.jsonl"
        assert generate_file(engine, prompts, out, None, Sampling(max_new_tokens=4)) == 1
        answer = json.loads(out.read_text(encoding="utf-8"))["answer"]
        assert answer == expected if expected else answer
