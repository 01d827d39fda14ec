"""`ezo run` end to end on the demo recipe, cut to seconds: every stage for real on the bundled model and data,
the top-level report, a no-op rerun, and an edit that reruns only the stages it affects."""
import json
from pathlib import Path

import pytest
import transformers
from typer.testing import CliRunner

from ezoforge.cli import app
from ezoforge.config import load_recipe
from ezoforge.errors import ConfigError
from ezoforge.pipeline import FOLDERS, run_recipe, steps

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"
# The demo's recipe with sizes for a test: two documents, two training steps, no judge, short answers.
SMALL = ["synth.limit=2", "synth.pairs_per_doc=1", "synth.max_passage_tokens=400", "synth.generation.max_new_tokens=64",
         "train.max_steps=2", "train.save_every=2", "train.max_length=256", "eval.judge_url=null",
         "eval.judge_model=null", "eval.limit=2", "eval.generation.max_new_tokens=12"]


def done_times(workdir: Path) -> dict[str, int]:
    return {step: (workdir / folder / "DONE").stat().st_mtime_ns for step, folder in FOLDERS.items()}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    recipe = load_recipe(DEMO, [f"workdir={workdir}", *SMALL])
    return recipe, run_recipe(recipe, DEMO)


def test_every_stage_writes_its_folder_and_the_report_reads_them(demo_run):
    recipe, report = demo_run
    workdir = Path(recipe.workdir)
    assert steps(recipe) == list(FOLDERS)
    for folder in FOLDERS.values():
        assert (workdir / folder / "DONE").exists(), folder
    on_disk = json.loads((workdir / "report.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(report))
    curate = json.loads((workdir / "curate" / "stats.json").read_text(encoding="utf-8"))
    assert report["curate"]["docs_out"] == curate["docs_out"] and sum(report["curate"]["removed_by_filter"].values()) > 0
    synth = json.loads((workdir / "synth" / "stats.json").read_text(encoding="utf-8"))
    assert report["synth"]["pairs"] == synth["pairs"] > 0 and report["synth"]["documents"] == 2
    assert report["train"]["steps"] == 2 and report["train"]["tokens_per_s"] > 0
    base, tuned = report["eval"]["base"], report["eval"]["tuned"]
    for side, folder in ((base, "eval-base"), (tuned, "eval-tuned")):
        own = json.loads((workdir / folder / "report.json").read_text(encoding="utf-8"))
        assert side["perplexity"] == own["perplexity"] > 1 and side["chrf"] == own["chrf"]
    assert tuned["model"] != base["model"]
    change = 100 * (tuned["perplexity"] / base["perplexity"] - 1)
    assert report["eval"]["perplexity_change_pct"] == round(change, 2)
    assert all(info["seconds"] is not None for info in report["stages"].values())
    html = (workdir / "report.html").read_text(encoding="utf-8")
    for section in ("Curation", "Synthesis", "Training", "Base vs tuned", "data:image/png;base64,"):
        assert section in html


def test_merged_model_loads_in_plain_transformers(demo_run):
    recipe, _ = demo_run
    merged = Path(recipe.workdir) / "merged"
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    assert model.config.model_type == "llama" and tok.chat_template


def test_rerun_is_a_no_op_and_an_edit_is_refused_until_forced(demo_run):
    recipe, report = demo_run
    workdir = Path(recipe.workdir)
    before = done_times(workdir)
    again = run_recipe(recipe, DEMO)
    assert done_times(workdir) == before
    assert again["stages"] == report["stages"]  # skipped stages keep the time they took when they ran

    # How often to save, log and keep checkpoints, workers, concurrency: nothing is redone.
    operational = load_recipe(DEMO, [f"workdir={workdir}", *SMALL, "train.save_every=1", "train.log_every=5",
                                     "curate.workers=2", "synth.concurrency=9", "eval.concurrency=2"])
    run_recipe(operational, DEMO)
    assert done_times(workdir) == before

    edited = load_recipe(DEMO, [f"workdir={workdir}", *SMALL, "train.learning_rate=1e-4"])
    train_files = {p: p.stat().st_mtime_ns for p in (workdir / "train").rglob("*")}
    with pytest.raises(ConfigError, match=rf"train: {workdir / 'train'} was made with other settings — "
                                          r"train.learning_rate: 0.0003 → 0.0001"):
        run_recipe(edited, DEMO)
    assert {p: p.stat().st_mtime_ns for p in (workdir / "train").rglob("*")} == train_files

    run_recipe(edited, DEMO, force=["train"])
    after = done_times(workdir)
    changed = {step for step in FOLDERS if after[step] != before[step]}
    assert changed == {"train", "merge", "eval-tuned", "export"}  # the card reads what changed
    assert json.loads((workdir / "train" / "stats.json").read_text())["resumed_from_step"] == 0


def test_shipped_recipes_validate():
    for name in ("demo.yaml", "llama31-8b.yaml", "llama31-70b-ezo.yaml"):
        path = ROOT / "recipes" / name
        assert path.read_text(encoding="utf-8").startswith("#")  # the command and hardware come first
        result = CliRunner().invoke(app, ["validate", str(path)])
        assert result.exit_code == 0, result.output
