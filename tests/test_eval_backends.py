"""eval's answers come from synth's backends: the model in this process (the default) or an OpenAI-compatible
server, here a real `ezo serve` of the same bundled model on loopback."""
import importlib.util
import json
from importlib.resources import files
from pathlib import Path

import pytest

from conftest import BUNDLED
from ezoforge.errors import ConfigError
from ezoforge.eval.run import run
from ezoforge.stages import Recipe

TASKS = f"elyza100:{files('ezoforge') / 'data' / 'tasks' / 'demo-tasks.jsonl'}"


def recipe(cache: Path, **eval_settings) -> Recipe:
    # Two prompts; each request carries its explicit system message (the EZO prompt), so a server adds none. Local
    # answers on transformers, as `live_server` answers.
    return Recipe.model_validate({"model": {"name": BUNDLED}, "eval": {
        "tasks": [TASKS], "limit": 2, "cache": str(cache), "generation": {"max_new_tokens": 24},
        "backend": "transformers", **eval_settings}})


def answers(out: Path) -> list[str]:
    return [json.loads(line)["answer"] for line in (out / "answers.jsonl").read_text(encoding="utf-8").splitlines()]


def test_answers_through_ezo_serve_equal_the_local_ones(live_server, tmp_path):
    cache = tmp_path / "cache.sqlite"  # shared: the served answers must not be taken for the local ones
    local = run(recipe(cache), tmp_path / "local")
    served = run(recipe(cache, backend="openai", base_url=f"{live_server}/v1"), tmp_path / "served")
    stats = json.loads((tmp_path / "served" / "stats.json").read_text())
    assert stats["answers_computed"] == 2 and stats["model_loaded"] is False  # asked the server, loaded nothing
    assert len(answers(tmp_path / "local")) == 2 and all(answers(tmp_path / "local"))
    assert answers(tmp_path / "served") == answers(tmp_path / "local")  # greedy: the same model, the same text
    assert served["chrf"] == local["chrf"]


def test_a_served_backend_refuses_an_adapter_before_answering(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"eval.backend openai answers with a whole model.*merge it first"):
        run(recipe(tmp_path / "c.sqlite", backend="openai", base_url="http://127.0.0.1:9/v1"), tmp_path / "out",
            adapter=adapter)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_backend_without_vllm_names_the_extra(tmp_path):
    with pytest.raises(ConfigError, match=r"backend 'vllm' needs the gpu extra"):
        run(recipe(tmp_path / "c.sqlite", backend="vllm"), tmp_path / "out")


def test_vllm_settings_under_another_backend_are_refused():
    with pytest.raises(ValueError, match=r"vllm.quantization is a vllm-backend setting; backend 'transformers'"):
        recipe(Path("c.sqlite"), vllm={"quantization": "fp8"})
