"""`ezo run` end to end on the demo recipe, cut to seconds: every stage for real on the bundled model and data
(the session's `demo_run`, judged by the scripted judge), the top-level report, a no-op rerun, and an edit that
reruns only the stages it affects."""
import json
from pathlib import Path

import pytest
import transformers
from typer.testing import CliRunner

from conftest import DEMO
from ezoforge.cli import app
from ezoforge.errors import ConfigError
from ezoforge.pipeline import run_recipe, steps
from ezoforge.stages import STEPS
from ezoforge.text import japanese_ratio
from scripted_judge import expected_grade

ROOT = Path(__file__).resolve().parents[1]


def done_times(workdir: Path) -> dict[str, int]:
    return {step: (workdir / s.folder / "DONE").stat().st_mtime_ns for step, s in STEPS.items()
            if (workdir / s.folder).exists()}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_every_stage_writes_its_folder_and_the_report_reads_them(demo_run):
    workdir, report = demo_run.workdir, demo_run.report
    assert steps(demo_run.recipe()) == [s for s in STEPS if s not in ("prefer", "reinforce", "eval-sft")]  # opt-in
    # The pairwise step: the scripted judge names the longer answer (a tie at equal length), in both orders.
    from scripted_judge import expected_winner

    answers = {side: {r["task_id"]: r["answer"] for r in rows(workdir / f"eval-{side}" / "answers.jsonl")}
               for side in ("base", "tuned")}
    verdicts = rows(workdir / "pairwise" / "verdicts.jsonl")
    assert [v["orders"] for v in verdicts] == [
        [{"A": "loss", "B": "win", "tie": "tie"}[expected_winner(answers["base"][t], answers["tuned"][t])],
         {"A": "win", "B": "loss", "tie": "tie"}[expected_winner(answers["tuned"][t], answers["base"][t])]]
        for t in (v["task_id"] for v in verdicts)]
    assert report["eval"]["pairwise"]["against"][0]["pairs"] == len(verdicts) == len(answers["tuned"])
    assert "head to head, eval-tuned against eval-base: win rate " in (workdir / "report.html").read_text()
    assert "Head to head, each task's two answers judged in both orders" in (workdir / "export" / "README.md").read_text()
    for folder in (STEPS[s].folder for s in steps(demo_run.recipe())):
        assert (workdir / folder / "DONE").exists(), folder
    on_disk = json.loads((workdir / "report.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(report))
    # One sentence per stage, said once: the card lists the model's stages in the run report's words.
    made = [f"- **{s}**: {on_disk['stages'][s]['summary']}" for s in ("curate", "synth", "train", "merge")]
    card = (workdir / "export" / "README.md").read_text(encoding="utf-8")
    assert "## How it was made\n\n" + "\n".join(made) + "\n" in card
    curate = json.loads((workdir / "curate" / "stats.json").read_text(encoding="utf-8"))
    assert report["curate"]["docs_out"] == curate["docs_out"] and sum(report["curate"]["removed_by_filter"].values()) > 0
    synth = json.loads((workdir / "synth" / "stats.json").read_text(encoding="utf-8"))
    assert report["synth"]["pairs"] == synth["pairs"] > 0 and report["synth"]["documents"] == 2
    assert report["train"]["steps"] == 2 and report["train"]["tokens_per_s"] > 0
    base, tuned = report["eval"]["base"], report["eval"]["tuned"]
    for side, folder in ((base, "eval-base"), (tuned, "eval-tuned")):
        own = json.loads((workdir / folder / "report.json").read_text(encoding="utf-8"))
        assert side["perplexity"] == own["perplexity"] > 1 and side["chrf"] == own["chrf"]
        # the scripted judge's known verdicts: every answer graded, the mean of their grades
        grades = [expected_grade(a["answer"]) for a in rows(workdir / folder / "answers.jsonl")]
        assert len(grades) == 3 and side["mean_grade"] == own["mean_grade"] == round(sum(grades) / 3, 4)
        assert [j["grade"] for j in rows(workdir / folder / "judgements.jsonl")] == grades
        mainly = [japanese_ratio(a["answer"]) >= 0.5 for a in rows(workdir / folder / "answers.jsonl")]
        assert side["japanese_answers"] == own["japanese_answers"] == round(sum(mainly) / len(mainly), 4)
    assert tuned["model"] != base["model"]
    change = 100 * (tuned["perplexity"] / base["perplexity"] - 1)
    assert report["eval"]["perplexity_change_pct"] == round(change, 2)
    assert all(info["seconds"] is not None for info in report["stages"].values())
    html = (workdir / "report.html").read_text(encoding="utf-8")
    for section in ("Curation", "Synthesis", "Training", "Base vs tuned", "data:image/png;base64,"):
        assert section in html


def test_merged_model_loads_in_plain_transformers(demo_run):
    merged = demo_run.workdir / "merged"
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    assert model.config.model_type == "llama" and tok.chat_template


def test_rerun_is_a_no_op_and_an_edit_is_refused(demo_run):
    """On the session's run itself: each of these leaves it untouched (the DONE times prove it), or the test fails."""
    workdir, report = demo_run.workdir, demo_run.report
    before = done_times(workdir)
    sent = len(demo_run.judge.requests)
    again = run_recipe(demo_run.recipe(), DEMO)
    assert done_times(workdir) == before
    assert again["stages"] == report["stages"]  # skipped stages keep the time they took when they ran

    # How often to save, log and keep checkpoints, workers, concurrency: nothing is redone.
    operational = demo_run.recipe(None, "train.save_every=1", "train.log_every=5", "curate.workers=2",
                                  "synth.concurrency=9", "eval.concurrency=2")
    run_recipe(operational, DEMO)
    assert done_times(workdir) == before and len(demo_run.judge.requests) == sent

    edited = demo_run.recipe(None, "train.learning_rate=1e-4")
    train_files = {p: p.stat().st_mtime_ns for p in (workdir / "train").rglob("*")}
    with pytest.raises(ConfigError, match=rf"train: {workdir / 'train'} was made with other settings — "
                                          r"train.learning_rate: 0.0003 → 0.0001"):
        run_recipe(edited, DEMO)
    assert {p: p.stat().st_mtime_ns for p in (workdir / "train").rglob("*")} == train_files
    assert done_times(workdir) == before


def test_a_forced_edit_redoes_only_the_stages_it_affects(demo_copy):
    workdir = demo_copy.workdir
    before = done_times(workdir)
    sent = len(demo_copy.judge.requests)
    # a merge setting: the merged model, what scores it, the head-to-head and the card that reads them are redone;
    # training and the base's eval are not (a forced train is test_reruns' test_force_retrains_from_step_zero)
    run_recipe(demo_copy.recipe(None, "merge.dtype=bfloat16"), DEMO, force=["merge"])
    after = done_times(workdir)
    changed = {step for step in before if after[step] != before[step]}
    assert changed == {"merge", "eval-tuned", "pairwise", "export"}
    assert json.loads((workdir / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    # the tuned model's new answers graded with the known verdicts; at most those were sent (an unchanged answer is
    # a cache hit), none of the base model's (all stored)
    answers = rows(workdir / "eval-tuned" / "answers.jsonl")
    assert [j["grade"] for j in rows(workdir / "eval-tuned" / "judgements.jsonl")] == \
        [expected_grade(a["answer"]) for a in answers]
    assert len(demo_copy.judge.requests) - sent <= len(answers)


def test_shipped_recipes_validate():
    for name in ("demo.yaml", "llama31-8b.yaml", "llama31-70b-ezo.yaml"):
        path = ROOT / "recipes" / name
        assert path.read_text(encoding="utf-8").startswith("#")  # the command and hardware come first
        result = CliRunner().invoke(app, ["validate", str(path)])
        assert result.exit_code == 0, result.output

