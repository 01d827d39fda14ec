"""A new stage is its package and one Step line: the recipe takes its section and its name in `stages`, `ezo plan`
plans it by its own estimate, it runs in its place in the run order, a rerun treats its settings as its section
declares them, and the run's records follow it (`tests/pairstats_stage.py`)."""
import pytest

import pairstats_stage
from ezoforge import stages
from ezoforge.config import BACKENDS, imported
from ezoforge.errors import ConfigError
from ezoforge.pipeline import forced_steps, run_step
from ezoforge.plan import plan
from ezoforge.stage import done_info, lineage
from ezoforge.stages import STEPS, Step, load_recipe

# The one line a new stage adds to stages.STEPS.
PAIRSTATS = Step("pairstats", "pairstats", "pairstats", ("synth",), pairstats_stage.run,
                 pairstats_stage.PairStatsConfig, "pairstats_stage:estimate", "pairstats_stage:summary")


@pytest.fixture
def registered(monkeypatch):
    """STEPS with PAIRSTATS after synth, in run order, and the recipe built from them; both restored after."""
    before = dict(STEPS)
    order = [s for name, s in before.items() for s in ([s, PAIRSTATS] if name == "synth" else [s])]
    STEPS.clear()
    STEPS.update({s.name: s for s in order})
    monkeypatch.setattr(stages, "Recipe", stages.recipe_model(STEPS))
    monkeypatch.setitem(BACKENDS, "canned", "canned_backend:CannedBackend")  # synth without a model
    yield
    STEPS.clear()
    STEPS.update(before)


def test_without_its_step_line_neither_the_stage_nor_its_section_exists():
    with pytest.raises(ConfigError, match="stages: Value error, unknown stage .pairstats.: one of curate, synth"):
        load_recipe(None, ["stages=[curate,synth,pairstats]"])
    with pytest.raises(ConfigError, match="pairstats: unknown key"):
        load_recipe(None, ["pairstats.min_chars=2"])


def test_a_new_stage_is_its_package_and_one_step_line(registered, tmp_path):
    work = tmp_path / "run"
    overrides = [f"workdir={work}", "stages=[curate,synth,pairstats]", "synth.backend=canned",
                 "curate.inputs=[bundled:wiki/jawiki-demo-pages-articles.xml]", "synth.limit=2"]
    recipe = load_recipe(None, [*overrides, "pairstats.min_chars=2"])
    assert recipe.pairstats.min_chars == 2 and stages.steps(recipe) == ["curate", "synth", "pairstats"]
    with pytest.raises(ConfigError, match="pairstats.min_chars: Input should be greater than or equal to 1"):
        load_recipe(None, [*overrides, "pairstats.min_chars=0"])

    planned = plan(recipe, "h100")
    assert planned["stages"]["pairstats"]["gpu_gib"] == 0.0 and planned["stages"]["pairstats"]["ram_gib"] == 0.5
    assert planned["sources"]["pairstats"] == "model: synth's pairs read once on the CPU"

    for step in stages.steps(recipe):
        run_step(step, recipe, work)
    folder = work / "pairstats"
    stats = (folder / "stats.json").read_text()
    assert [(p.name, done.stage) for p, done in lineage(folder)] == [
        ("pairstats", "pairstats"), ("synth", "synth"), ("curate", "curate")]
    assert imported(PAIRSTATS.summary)(folder).endswith("characters on average")
    assert "pairstats" in forced_steps(stages.steps(recipe), ["synth"])  # redoing synth redoes it

    # An operational key changes nothing; an output key is refused, named as the recipe names it.
    again = load_recipe(None, [*overrides, "pairstats.min_chars=2", "pairstats.log_every=5"])
    assert run_step("pairstats", again, work) == done_info(folder).stats
    assert (folder / "stats.json").read_text() == stats
    with pytest.raises(ConfigError, match="was made with other settings — .*pairstats.min_chars"):
        run_step("pairstats", load_recipe(None, [*overrides, "pairstats.min_chars=3"]), work)
