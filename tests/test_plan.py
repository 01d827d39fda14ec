"""`ezo plan`: measured figures where they exist (with their source named) and the synth data mix."""
from pathlib import Path

import pytest

from ezoforge.config import load_recipe
from ezoforge.plan import MEASURED, plan

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEMO = RECIPES / "demo.yaml"


def test_plan_uses_measured_figures_at_their_shape_and_names_every_source():
    recipe = load_recipe(RECIPES / "llama31-70b-ezo.yaml", [])
    measured = MEASURED[("llama-3.1-70b", "h100")]
    on_h100 = plan(recipe, "h100")
    assert on_h100["train_memory_gib"] == measured.peak_gib
    assert on_h100["assumptions"]["train_tokens_per_s"] == round(measured.tokens_per_s)
    assert on_h100["sources"]["train_memory_gib"].startswith("measured: 1 x 4096 tokens, HF+peft QLoRA reference")
    # Another card, or another shape on the same card: the calibrated model, and the plan says so.
    for other in (plan(recipe, "l40s"), plan(load_recipe(RECIPES / "llama31-70b-ezo.yaml",
                                                          ["train.max_length=2048"]), "h100")):
        assert other["train_memory_gib"] != measured.peak_gib
        assert all(src.startswith("model:") for src in other["sources"].values())


def test_plan_shows_the_synth_mix(bundled):
    set_ = plan(load_recipe(DEMO))["synth_mix"]
    assert set_ == {"basis": "synth.mix", "sources": {"fineweb": {"share": 0.5, "documents": 4},
                                                      "wikipedia": {"share": 0.5, "documents": 4}}}
    estimated = plan(load_recipe(DEMO, ["synth.mix=null"]))["synth_mix"]
    assert estimated["basis"] == "input sizes (estimate)" and set(estimated["sources"]) == {"wikipedia", "fineweb"}
    assert sum(v["share"] for v in estimated["sources"].values()) == pytest.approx(1, abs=0.002)
    assert all(v["documents"] >= 1 for v in estimated["sources"].values())
