"""The stage registry: every `ezo run` step, its folder under the workdir, the steps whose folders it reads, how it
runs from the recipe, and what its stage declares in its package (its settings, its `ezo plan` estimate, its
sentence). The pipeline (order, `--force STAGE`), the run report, `ezo plan` and the CLI read it from here, and the
whole recipe (`Recipe`) is built from it.

A step belongs to one of the recipe's stages (`recipe.stages`); eval is three steps, the base model, the SFT model
alone (with a prefer or reinforce stage) and the tuned one. Each `run` is handed the folders of the steps it reads,
and only those, so what it reads and what a `--force` redoes after it cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import Field, create_model

from ezoforge import config
from ezoforge.config import Section
from ezoforge.curate.settings import CurateConfig
from ezoforge.eval.settings import EvalConfig
from ezoforge.export.settings import ExportConfig
from ezoforge.prefer.settings import PreferConfig
from ezoforge.reinforce.settings import ReinforceConfig
from ezoforge.synth.settings import SynthConfig
from ezoforge.train.settings import MergeConfig, TrainConfig

# run(recipe, out, read, force) -> the stage's stats; `read` maps each step in `reads` to its folder.
Runner = Callable[[config.Recipe, Path, dict[str, Path], bool], dict]


@dataclass(frozen=True)
class Step:
    name: str  # the step, as `--force` and the run report name it
    stage: str  # the recipe stage it belongs to
    folder: str  # its folder under the workdir
    reads: tuple[str, ...]  # the steps whose folders it reads: redoing one of them redoes this one
    run: Runner
    settings: type[Section]  # the stage's recipe section, declared in its package (its steps name the same one)
    # "module:function" in its package: `estimate(planner, step) -> figures` for `ezo plan` (`plan.Planner`), imported
    # only when a plan is made.
    estimate: str
    # "module:function" in its package: `summary(folder) -> str`, the finished step in one sentence (the run report's
    # and the stage's own command's)
    summary: str
    when: Callable[[config.Recipe], bool] = lambda recipe: True  # whether the recipe runs it, when its stage is there


def _curate(recipe: Recipe, out: Path, read: dict[str, Path], force: bool) -> dict:
    from ezoforge.curate.run import run
    return run(recipe, recipe.curate.inputs, out, force=force)


def _synth(recipe: Recipe, out: Path, read: dict[str, Path], force: bool) -> dict:
    from ezoforge.synth.run import run
    return run(recipe, read["curate"], out, force=force)


def _train(recipe: Recipe, out: Path, read: dict[str, Path], force: bool) -> dict:
    from ezoforge.train.run import run
    return run(recipe, [read["synth"]], out, force=force)


def _prefer(recipe: Recipe, out: Path, read: dict[str, Path], force: bool) -> dict:
    from ezoforge.prefer.run import run
    return run(recipe, read["train"], out, force=force)


def _reinforce(recipe: Recipe, out: Path, read: dict[str, Path], force: bool) -> dict:
    from ezoforge.reinforce.run import run
    return run(recipe, _tuned(recipe, read, before="reinforce"), out, force=force)


# The stages that continue the SFT adapter, in run order: each continues the one before it that the recipe holds,
# and the last made the tuned model.
AFTER_SFT = ("prefer", "reinforce")


def after_sft(recipe: Recipe) -> bool:
    return any(s in recipe.stages for s in AFTER_SFT)


def _tuned(recipe: Recipe, read: dict[str, Path], before: str | None = None) -> Path:
    """The folder whose adapter is the tuned model (before the stage `before`, when given): the last stage that
    continued the SFT adapter (GRPO's, DPO's), else the SFT's."""
    stages = AFTER_SFT[:AFTER_SFT.index(before)] if before else AFTER_SFT
    return next((read[s] for s in reversed(stages) if s in recipe.stages), read["train"])


def _merge(recipe: Recipe, out: Path, read: dict[str, Path], force: bool) -> dict:
    from ezoforge.train.merge import run
    return run(_tuned(recipe, read), out, recipe.merge.dtype, force=force)


def _eval_base(recipe: Recipe, out: Path, read: dict[str, Path], force: bool) -> dict:
    from ezoforge.eval.run import run
    return run(_base_as_trained(recipe, read), out, force=force)


def _base_as_trained(recipe: Recipe, read: dict[str, Path]) -> Recipe:
    """The recipe with its hub base pinned to the commit train loaded (train's DONE records it), so eval-base scores
    the base the tuned model grew from even where the hub has moved on since; as it is without a train stage."""
    from ezoforge.models import pin
    from ezoforge.stage import done_info

    info = done_info(read["train"]) if "train" in recipe.stages else None
    revision = info and info.settings["model"].get("revision")
    if not revision:
        return recipe
    pinned = recipe.model_copy(deep=True)
    pinned.model.name = pin(recipe.model.name, revision)
    return pinned


def _eval_sft(recipe: Recipe, out: Path, read: dict[str, Path], force: bool) -> dict:
    from ezoforge.eval.run import run
    return run(recipe, out, adapter=read["train"] / "adapter", force=force)


def _eval_tuned(recipe: Recipe, out: Path, read: dict[str, Path], force: bool) -> dict:
    from ezoforge.eval.run import run, scores_adapter
    if "merge" in recipe.stages and not scores_adapter(recipe):
        tuned = recipe.model_copy(deep=True)
        tuned.model.name = str(read["merge"])
        return run(tuned, out, force=force)
    return run(recipe, out, adapter=_tuned(recipe, read) / "adapter", force=force)


def _pairwise(recipe: Recipe, out: Path, read: dict[str, Path], force: bool) -> dict:
    from ezoforge.eval.pairwise import run
    evals = [read["eval-base"], *([read["eval-sft"]] if after_sft(recipe) else []), read["eval-tuned"]]
    return run(evals, recipe.eval, out, force=force)


def _export(recipe: Recipe, out: Path, read: dict[str, Path], force: bool) -> dict:
    from ezoforge.export.run import run
    evals = {step.removeprefix("eval-"): folder for step, folder in read.items() if STEPS[step].stage == "eval"}
    return run(read["merge"], out, recipe.export, recipe.model.system_prompt, evals=evals,
               made=how_it_was_made(read["merge"]), force=force)


# In run order: prefer and reinforce between train and merge (merge folds the last adapter), export last (its card
# reads the evals).
ANSWERS, EVAL_WORDS = "ezoforge.eval.estimate:answers", "ezoforge.eval.run:summary"
STEPS = {s.name: s for s in (
    Step("curate", "curate", "curate", (), _curate, CurateConfig, "ezoforge.curate.estimate:estimate",
         "ezoforge.curate.run:summary"),
    Step("synth", "synth", "synth", ("curate",), _synth, SynthConfig, "ezoforge.synth.estimate:estimate",
         "ezoforge.synth.run:summary"),
    Step("train", "train", "train", ("synth",), _train, TrainConfig, "ezoforge.train.estimate:train",
         "ezoforge.train.run:summary"),
    Step("prefer", "prefer", "prefer", ("train",), _prefer, PreferConfig, "ezoforge.prefer.estimate:estimate",
         "ezoforge.prefer.run:summary"),
    Step("reinforce", "reinforce", "reinforce", ("train", "prefer"), _reinforce, ReinforceConfig,
         "ezoforge.reinforce.estimate:estimate", "ezoforge.reinforce.run:summary"),
    Step("merge", "merge", "merged", ("train", "prefer", "reinforce"), _merge, MergeConfig,
         "ezoforge.train.estimate:merge", "ezoforge.train.merge:summary"),
    # eval-base reads train's folder for the base's revision it loaded
    Step("eval-base", "eval", "eval-base", ("train",), _eval_base, EvalConfig, ANSWERS, EVAL_WORDS),
    Step("eval-sft", "eval", "eval-sft", ("train",), _eval_sft, EvalConfig, ANSWERS, EVAL_WORDS, when=after_sft),
    Step("eval-tuned", "eval", "eval-tuned", ("train", "prefer", "reinforce", "merge"), _eval_tuned, EvalConfig,
         ANSWERS, EVAL_WORDS, when=lambda r: "train" in r.stages or "merge" in r.stages),
    Step("pairwise", "eval", "pairwise", ("eval-base", "eval-sft", "eval-tuned"), _pairwise, EvalConfig,
         "ezoforge.eval.estimate:pairwise", "ezoforge.eval.pairwise:summary",
         when=lambda r: r.eval.pairwise and ("train" in r.stages or "merge" in r.stages)),
    Step("export", "export", "export", ("merge", "eval-base", "eval-sft", "eval-tuned", "pairwise"), _export,
         ExportConfig, "ezoforge.export.estimate:estimate", "ezoforge.export.run:summary"),
)}


def recipe_model(steps: dict[str, Step]) -> type[config.Recipe]:
    """The whole recipe: `config.Recipe`'s own keys and a section for each stage, as its steps declare it."""
    sections: dict[str, type[Section]] = {}
    for step in steps.values():
        if sections.setdefault(step.stage, step.settings) is not step.settings:
            raise TypeError(f"step {step.name} names another settings class for stage {step.stage}")
    model = create_model("Recipe", __base__=config.Recipe, __module__=__name__,
                         **{stage: (cls, Field(default_factory=cls)) for stage, cls in sections.items()})
    model.stage_names = tuple(sections)
    return model


Recipe = recipe_model(STEPS)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None, flag_names: dict[str, str] | None = None) -> config.Recipe:
    """A recipe file (or the defaults when path is None) as the whole recipe, `extra` (CLI flags, dotted key ->
    value, named in errors by `flag_names`) and --set overrides applied (`config.parse_recipe`)."""
    return config.parse_recipe(Recipe, path, overrides, extra, flag_names)


def how_it_was_made(folder: Path) -> list[tuple[str, str]]:
    """The finished folders behind `folder` (its lineage, `folder` last), each as (its stage, its sentence as the stage
    says it, `Step.summary`): what the model card lists. A folder of a stage this registry does not hold is left out."""
    from ezoforge.stage import lineage

    said = {}
    for step in STEPS.values():
        said.setdefault(step.stage, step.summary)  # eval's folders are its evals'; pairwise's is its own stage
        said.setdefault(step.name, step.summary)
    return [(done.stage, config.imported(said[done.stage])(path))
            for path, done in reversed(lineage(folder)) if done.stage in said]


def steps(recipe: Recipe) -> list[str]:
    """The recipe's stages as steps, in run order."""
    return [s.name for s in STEPS.values() if s.stage in recipe.stages and s.when(recipe)]


def readers(step: str) -> list[str]:
    """The steps that read `step`'s folder."""
    return [s.name for s in STEPS.values() if step in s.reads]


def eval_folders(workdir: Path) -> dict[str, Path]:
    """The eval steps' folders in a workdir, by the model each evaluated (base, sft, tuned), and `pairwise`."""
    return {s.name.removeprefix("eval-"): workdir / s.folder for s in STEPS.values() if s.stage == "eval"}
