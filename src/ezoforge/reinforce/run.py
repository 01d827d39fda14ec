"""`ezo reinforce TRAIN_OR_PREFER_DIR --out DIR`: GRPO after the SFT (or SFT → DPO), rewarded by named functions.

Prompts are the instructions the SFT was trained on, each with its passage (the SFT folder's DONE names them; never
eval tasks), drawn seeded; the first `reinforce.held_out` are never trained on. Completions are rewarded by the
recipe's `reinforce.rewards` (reinforce/rewards.py) and GRPO updates the adapter it continues (reinforce/grpo.py).
The rewards of `num_generations` completions per held-out prompt, and per as many trained prompts, sampled from a
fixed seed, are scored before and after: a reward that rises on trained prompts only is a reward being gamed.

DIR/adapter (the starting adapter after GRPO: `ezo merge DIR` gives the final model), DIR/checkpoints,
DIR/metrics.jsonl (a row per step: loss, KL, each reward's mean and spread), DIR/rewards.png, DIR/loss.png,
DIR/requests.sqlite (the judge's verdicts), DIR/stats.json, DIR/DONE.
"""
from __future__ import annotations

import gc
import inspect
import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from ezoforge.cache import RequestCache
from ezoforge.config import ModelConfig, Recipe, output_settings
from ezoforge.errors import ConfigError, ModelError
from ezoforge.eval import judge_prompt
from ezoforge.reinforce import rewards
from ezoforge.stage import Stage, done_info, lineage
from ezoforge.train.continued import JUDGE_KEYS, Instruction, draw, read_instructions, sft

log = logging.getLogger(__name__)

CACHE = "requests.sqlite"


def sft_behind(tuned_dir: Path) -> Path:
    """The SFT folder behind the folder GRPO continues (a finished train or prefer folder, with its adapter): itself,
    or the train folder its lineage reaches."""
    if done_info(tuned_dir) is None or not (tuned_dir / "adapter" / "adapter_config.json").is_file():
        raise ModelError(f"{tuned_dir}: not a finished `ezo train` or `ezo prefer` folder (needs adapter/ and DONE)")
    trains = [p for p, d in lineage(tuned_dir) if d.stage == "train"]
    if not trains:
        raise ModelError(f"{tuned_dir}: no `ezo train` folder behind it (DONE's inputs): reinforce needs the SFT's "
                         "instructions")
    return trains[0]


def reinforce_output(recipe: Recipe, engine: str) -> dict[str, Any]:
    """What shapes the stage's output: the reinforce section with the rewards that count (a reward weighted 0, and
    the length budget without a length reward, change nothing); the engine that samples, resolved; with a judge
    reward, the judge's keys and prompt version; with a user's reward, the digest of the file that defines it."""
    from ezoforge.models import file_digest

    cfg = recipe.reinforce
    section = {**output_settings(cfg), "rewards": cfg.active, "engine": engine}
    if "length" not in cfg.active:
        section.pop("length_budget")
    output: dict[str, Any] = {"reinforce": section}
    if "judge" in cfg.active:
        ev = output_settings(recipe.eval)
        output.update(eval={k: ev[k] for k in JUDGE_KEYS}, prompt_version=judge_prompt.PROMPT_VERSION)
    users = {}
    for name in cfg.active:
        if ":" in name:
            source = inspect.getsourcefile(inspect.getmodule(rewards.user_function(name)))
            users[name] = file_digest(Path(source)) if source else None
    if users:
        output["reward_code"] = users
    return output


def run(recipe: Recipe, tuned_dir: Path, out: Path, force: bool = False) -> dict:
    from ezoforge.models import check_model, check_spec, pick_device
    from ezoforge.reinforce.grpo import use_vllm
    from ezoforge.train.model import require_liger, use_qlora

    tuned_dir, out, cfg = Path(tuned_dir), Path(out), recipe.reinforce
    train_dir = sft_behind(tuned_dir)
    info, model, train = sft(train_dir, recipe)
    if "judge" in cfg.active:
        if not (recipe.eval.judge_url and recipe.eval.judge_model):
            raise ConfigError("reinforce.rewards.judge grades with the recipe's judge: set eval.judge_url and "
                              "eval.judge_model, or drop that reward")
        if recipe.eval.judge_url == "local":
            check_spec(recipe.eval.judge_model)
    check_model(model.name, tuned_dir / "adapter", model.device, model.chat_template, model.quantize)
    device = pick_device(model.device)
    require_liger(cfg.liger, "reinforce", device)
    qlora = use_qlora(train, device)
    vllm = use_vllm(cfg, device)
    found, skipped = read_instructions(info.inputs)
    drawn = draw(found, cfg.limit, cfg.seed)
    # As many prompts as the steps take, so every prompt trained on is seen and the trained prompts scored before
    # and after were really trained on.
    held, trained = drawn[:cfg.held_out], drawn[cfg.held_out:cfg.held_out + cfg.max_steps * cfg.batch_size *
                                                cfg.grad_accum]
    if not trained:
        raise ConfigError(f"reinforce.held_out={cfg.held_out} leaves no prompt to train on ({len(drawn)} drawn); "
                          "lower it or raise reinforce.limit")
    if len(drawn) > cfg.held_out + len(trained):
        log.info("reinforce: %d steps x %d prompts take %d of the %d instructions drawn (+%d held out)", cfg.max_steps,
                 cfg.batch_size * cfg.grad_accum, len(trained), len(drawn) - cfg.held_out, len(held))
    stage = Stage("reinforce", out, reinforce_output(recipe, "vllm" if vllm else "transformers"),
                  model=output_settings(model), inputs=[tuned_dir])
    if (finished := stage.start(force, keep=(CACHE,))) is not None:
        log.info("%s is already done with these settings", out)
        return finished
    with stage.claimed():
        return _reinforce(recipe, model, train, tuned_dir, out, stage, trained, held, skipped, device, qlora, vllm)


def rows_of(instructions: list[Instruction], system_prompt: str | None) -> list[dict]:
    """GRPO's dataset: the conversational prompt, and the columns rewards read (the synthesized response, the id)."""
    from ezoforge.infer.generate import build_messages

    return [{"prompt": build_messages(i.prompt, system_prompt), "reference": i.reference, "instruction_id": i.id}
            for i in instructions]


def _reinforce(recipe: Recipe, model: ModelConfig, train, tuned_dir: Path, out: Path, stage: Stage,
               trained: list[Instruction], held: list[Instruction], skipped: int, device: torch.device, qlora: bool,
               vllm: bool) -> dict:
    from ezoforge.models import load, load_tokenizer
    from ezoforge.reinforce import grpo
    from ezoforge.train import checkpoints
    from ezoforge.train.dpo import REF, load_policy
    from ezoforge.train.progress import TrainLog, plot_loss
    from ezoforge.train.trainer import hardware, save_adapter, summarize

    started, cfg, ev = time.perf_counter(), recipe.reinforce, recipe.eval
    cache = RequestCache(out / CACHE)
    with ExitStack() as stack:
        stack.callback(cache.close)
        # Every reward is made before the model loads: a judge without its key, a function that does not import,
        # fail here.
        functions, weights = rewards.build(cfg, ev, stack, lambda: load(ev.judge_model, None, model.device,
                                                                             model.dtype), cache)
        names = [f.__name__ for f in functions]
        tokenizer = load_tokenizer(model.name, model.chat_template)
        train_rows, held_rows = rows_of(trained, model.system_prompt), rows_of(held, model.system_prompt)
        folder = out / "checkpoints"
        resume = checkpoints.latest(folder)
        resume_step = checkpoints.check(resume, stage) if resume else 0
        checkpoints.clean(folder)
        policy = load_policy(model.name, tuned_dir / "adapter", train, device, qlora, model.dtype)
        train_log = TrainLog(out / "metrics.jsonl", resume_step, columns=grpo.reward_columns(names))
        saver = checkpoints.AtomicCheckpoints(folder, stage, cfg.keep_checkpoints, len(train_rows))
        trainer = grpo.make_trainer(policy, tokenizer, functions, weights, cfg, train, train_rows,
                                    folder / checkpoints.STAGING, device, vllm, [saver, train_log])
        log.info("GRPO (beta %g, %d completions per prompt, rewards %s) on %d prompts (+%d held out), %s r=%d "
                 "continuing %s on %s%s", cfg.beta, cfg.num_generations,
                 ", ".join(f"{n}×{w:g}" for n, w in zip(names, weights)), len(train_rows), len(held_rows),
                 "QLoRA" if qlora else "LoRA", policy.peft_config["default"].r, tuned_dir / "adapter", device,
                 f", resuming at step {resume_step}" if resume else "")
        # Scored with the starting adapter (a checkpoint loads inside train()), on held-out and as many trained
        # prompts.
        seen = train_rows[:len(held_rows)]
        before = {"held_out": grpo.score(trainer.model, tokenizer, held_rows, functions, weights, cfg),
                  "trained": grpo.score(trainer.model, tokenizer, seen, functions, weights, cfg)}
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        after = {"held_out": grpo.score(trainer.model, tokenizer, held_rows, functions, weights, cfg),
                 "trained": grpo.score(trainer.model, tokenizer, seen, functions, weights, cfg)}
        if REF in trainer.model.peft_config:
            trainer.model.delete_adapter(REF)  # the reference is the starting adapter, in its own folder
        save_adapter(trainer, out, True)
        checkpoints.clean(folder)
        judge = next((f for f in functions if isinstance(f, rewards.JudgeReward)), None)
        steps = trainer.state.global_step
    del trainer, policy
    gc.collect()
    plot_loss(train_log.rows, out / "loss.png")
    grpo.plot_rewards(train_log.rows, names, out / "rewards.png")
    logged = [r for r in train_log.rows if "loss" in r]
    s = summarize(train_log.rows)
    stats = {
        "prompts": len(train_rows), "held_out_prompts": len(held_rows), "instructions_skipped": skipped,
        "steps": steps, "rewards": dict(zip(names, weights)), "engine": "vllm" if vllm else "transformers",
        "loss_first": s["train_loss_first"], "loss_last": s["train_loss_last"], "step_s": s["step_s"],
        "kl_first": logged[0].get("kl") if logged else None, "kl_last": logged[-1].get("kl") if logged else None,
        "reward_first": logged[0].get("reward") if logged else None,
        "reward_last": logged[-1].get("reward") if logged else None,
        "before": before, "after": after,
        "gap_after": _gap(after), "qlora": qlora, "device": str(device), "hardware": hardware(device),
        "resumed_from_step": resume_step, "seconds": round(time.perf_counter() - started, 1)}
    if judge is not None:
        stats.update(judge=ev.judge_model, judge_served=sorted(judge.served), judge_unusable=judge.unusable,
                     judge_sent=judge.judge.sent, judge_cached=judge.judge.cached)
    finished = stage.finish(stats)
    log.info("%s", summary(out))
    return finished


def summary(folder: Path) -> str:
    """The stage in one sentence, from its finished folder: what `ezo reinforce` prints and the run report shows:
    steps, KL, and the weighted reward on held-out and trained prompts."""
    stats = done_info(folder).stats

    def change(kind: str) -> str:
        before, after = stats["before"][kind], stats["after"][kind]
        return f"{before['reward']:.3f} → {after['reward']:.3f}" if before and after else "–"

    weights = ", ".join(f"{n}×{w:g}" for n, w in stats["rewards"].items())
    kl = "" if stats["kl_last"] is None else f" · KL {stats['kl_first']} → {stats['kl_last']}"  # none at beta 0
    return (f"GRPO {stats['steps']} steps on {stats['prompts']} prompts ({weights}) · reward held-out "
            f"{change('held_out')}, trained {change('trained')}{kl}")


def _gap(scores: dict[str, dict | None]) -> float | None:
    """Trained minus held-out weighted reward: a wide gap is a reward learned for the prompts, not the task."""
    if not (scores["held_out"] and scores["trained"]):
        return None
    return round(scores["trained"]["reward"] - scores["held_out"]["reward"], 4)
