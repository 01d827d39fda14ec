"""`ezo plan` shows the synth data mix: the shares set in the recipe, or estimated from the curate inputs."""
from pathlib import Path

import pytest

from ezoforge.config import load_recipe
from ezoforge.plan import plan

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"


def test_plan_shows_the_synth_mix(bundled):
    set_ = plan(load_recipe(DEMO))["synth_mix"]
    assert set_ == {"basis": "synth.mix", "sources": {"fineweb": {"share": 0.5, "documents": 4},
                                                      "wikipedia": {"share": 0.5, "documents": 4}}}
    estimated = plan(load_recipe(DEMO, ["synth.mix=null"]))["synth_mix"]
    assert estimated["basis"] == "input sizes (estimate)" and set(estimated["sources"]) == {"wikipedia", "fineweb"}
    assert sum(v["share"] for v in estimated["sources"].values()) == pytest.approx(1, abs=0.002)
    assert all(v["documents"] >= 1 for v in estimated["sources"].values())
