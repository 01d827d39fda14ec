"""`ezo prefer TRAIN_DIR --out DIR`: preference pairs graded by the recipe's own judge, then DPO after the SFT.

Instructions come from the pairs TRAIN_DIR was trained on (its DONE marker names them; never eval tasks). For each,
`prefer.samples` answers are sampled from the SFT model (base + adapter) and, with the synthesized response, graded
by eval's judge (same client, prompt and cache keys); the best and worst make a pair when their grades differ by at
least `prefer.min_margin`. Every answer and verdict is stored in DIR/requests.sqlite as it arrives, so a rerun
after a kill sends only what is missing; DPO then resumes from its newest checkpoint (train/dpo.py).

DIR/data/pairs.jsonl, DIR/candidates.jsonl, DIR/verdicts.jsonl, DIR/adapter (the SFT adapter after DPO: `ezo merge
DIR` gives SFT+DPO), DIR/checkpoints, DIR/metrics.jsonl, DIR/loss.png, DIR/stats.json (margin histogram, DPO
loss, held-out margins), DIR/DONE.
"""
from __future__ import annotations

import functools
import gc
import logging
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ezoforge.cache import RequestCache, answer_key, cached
from ezoforge.config import ModelConfig, Recipe, output_settings
from ezoforge.errors import ConfigError, EzoError
from ezoforge.eval import judge_prompt
from ezoforge.prefer.pairs import build_pairs, histogram
from ezoforge.records import write_jsonl
from ezoforge.report_kit import fmt, plural
from ezoforge.stage import Stage, done_info
from ezoforge.train.continued import JUDGE_KEYS, Instruction, draw, read_instructions, sft
from ezoforge.train.settings import TrainConfig

log = logging.getLogger(__name__)

CACHE = "requests.sqlite"
def prefer_output(recipe: Recipe) -> dict[str, Any]:
    """The prefer section, the judge's keys of the eval section, and the judge prompt's version (the SFT it
    continues is its input, and its model)."""
    ev = output_settings(recipe.eval)
    return {"prefer": output_settings(recipe.prefer), "eval": {k: ev[k] for k in JUDGE_KEYS},
            "prompt_version": judge_prompt.PROMPT_VERSION}


def run(recipe: Recipe, train_dir: Path, out: Path, force: bool = False) -> dict:
    from ezoforge.models import check_model, check_spec, pick_device
    from ezoforge.train.model import require_liger, use_qlora

    train_dir, out, cfg = Path(train_dir), Path(out), recipe.prefer
    if not recipe.eval.judge_model:
        raise ConfigError("prefer: grades come from the recipe's judge: set eval.judge_url and eval.judge_model")
    info, model, train = sft(train_dir, recipe)
    check_model(model.name, train_dir / "adapter", model.device, model.chat_template, model.quantize)
    if recipe.eval.judge_url == "local":
        check_spec(recipe.eval.judge_model)
    device = pick_device(model.device)
    require_liger(cfg.liger, "prefer", device)
    qlora = use_qlora(train, device)  # the SFT's quantization; stated-but-impossible 4-bit fails here
    found, skipped = read_instructions(info.inputs)
    instructions = draw(found, cfg.limit, cfg.seed)
    stage = Stage("prefer", out, prefer_output(recipe), model=output_settings(model), inputs=[train_dir])
    # Answers and verdicts are keyed by all that determines them: a forced redo reuses them.
    if (finished := stage.start(force, keep=(CACHE,))) is not None:
        log.info("%s is already done with these settings", out)
        return finished
    with stage.claimed():
        return _prefer(recipe, model, train, train_dir, out, stage, instructions, skipped, device, qlora)


def _prefer(recipe: Recipe, model: ModelConfig, train: TrainConfig, train_dir: Path, out: Path, stage: Stage,
            instructions: list[Instruction], skipped: int, device: torch.device, qlora: bool) -> dict:
    from ezoforge.infer.generate import build_messages
    from ezoforge.models import load_tokenizer
    from ezoforge.train.data import split_eval
    from ezoforge.train.dpo import train_dpo

    started, counts, cfg = time.perf_counter(), Counter(), recipe.prefer
    adapter = train_dir / "adapter"
    messages = {i.id: build_messages(i.prompt, model.system_prompt) for i in instructions}
    cache = RequestCache(out / CACHE)
    with ExitStack() as stack:
        stack.callback(cache.close)
        answers = _sample(instructions, messages, model, adapter, cfg, cache, counts)
        candidates, verdicts, judge = _judge(instructions, answers, recipe, model, cache, stack, counts)
    gc.collect()  # the sampling and judging models go before training loads its own
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    write_jsonl(out / "candidates.jsonl", [c for i in instructions for c in candidates[i.id]])
    write_jsonl(out / "verdicts.jsonl", verdicts)
    failed = [v for v in verdicts if v["error"] and v["error"].startswith("judge request failed")]
    if failed:  # no DONE: a rerun sends only these again
        raise EzoError(f"{len(failed)} of {len(verdicts)} judge requests failed (first: {failed[0]['error']}; all "
                       f"in {out / 'verdicts.jsonl'}); rerun the same command to retry them")
    pairs, margins = build_pairs(instructions, candidates, messages, cfg.min_margin)
    if not pairs:
        raise EzoError(f"no pair kept: no instruction's best and worst answers differ by prefer.min_margin="
                       f"{cfg.min_margin:g} (margins seen: {histogram(margins) or 'none'}); lower it, or draw more "
                       "instructions (prefer.limit) or answers (prefer.samples)")
    write_jsonl(out / "data" / "pairs.jsonl", pairs)
    trained, held = split_eval(pairs, cfg.eval_fraction, cfg.seed)
    graded = [c for cs in candidates.values() for c in cs if c["grade"] is not None]
    figures = {
        "instructions": len(instructions), "instructions_skipped": skipped,
        "candidates": sum(len(cs) for cs in candidates.values()), "graded_candidates": len(graded),
        "verdicts": len(verdicts), "verdicts_unusable": sum(v["grade"] is None for v in verdicts),
        "pairs": len(pairs), "below_margin": sum(margins.values()) - len(pairs), "min_margin": cfg.min_margin,
        "margin_histogram": histogram(margins),
        "margin_mean": round(sum(p["margin"] for p in pairs) / len(pairs), 4),
        "grade_histogram": histogram(Counter(c["grade"] for c in graded)),
        "chosen_from": dict(Counter(p["chosen_source"] for p in pairs)),
        "rejected_from": dict(Counter(p["rejected_source"] for p in pairs)),
        "judge": recipe.eval.judge_model, "judge_served": judge, **counts}
    log.info("%d pairs kept of %d instructions (margin ≥ %g; histogram %s)", len(pairs), len(instructions),
             cfg.min_margin, figures["margin_histogram"])
    tokenizer = load_tokenizer(model.name, model.chat_template)
    dpo = train_dpo(model.name, model.dtype, adapter, tokenizer, cfg, train, trained, held, out, stage, device, qlora)
    return stage.finish({**figures, **dpo, "seconds": round(time.perf_counter() - started, 1)})


def _sample(instructions: list[Instruction], messages: dict[str, list], model: ModelConfig, adapter: Path, cfg,
            cache: RequestCache, counts: Counter) -> dict[str, list[dict]]:
    """`prefer.samples` answers per instruction from base + SFT adapter, each sample index with its own seed (eval's
    answer keys); the model loads only when an answer is missing from the cache."""
    from ezoforge.infer.generate import Generator, Sampling
    from ezoforge.models import load, model_identity

    fp = model_identity(model.name, adapter, model.dtype, model.device, model.chat_template, model.quantize)
    generator = functools.cache(lambda: Generator(load(model.name, adapter, model.device, model.dtype,
                                                       model.chat_template, quantize=model.quantize)))
    convs = [messages[i.id] for i in instructions]
    out: dict[str, list[dict]] = {i.id: [] for i in instructions}
    for s in range(cfg.samples):
        sampling = replace(Sampling.from_config(cfg.generation), seed=cfg.generation.seed + s)
        keys = [answer_key(fp, c, sampling, s) for c in convs]

        def compute(chosen: list[int], sampling=sampling) -> list[dict]:
            done = generator().complete([convs[k] for k in chosen], sampling)
            return [c.cached() for c in done]

        for ins, value in zip(instructions, cached(cache, keys, compute, cfg.generation.batch_size,
                                                   "answers", counts)):
            out[ins.id].append(value)
    generator.cache_clear()
    return out


def _judge(instructions: list[Instruction], answers: dict[str, list[dict]], recipe: Recipe, model: ModelConfig,
           cache: RequestCache, stack: ExitStack, counts: Counter) -> tuple[dict[str, list[dict]], list[dict], list]:
    """Every candidate graded by the recipe's judge (eval's client): the mean of its `eval.judgments` verdicts, or
    None when one was unusable. Candidates, the verdicts (each naming its candidate) and the judge as served."""
    from ezoforge.eval.items import OpenTask
    from ezoforge.eval.judge_client import Judge
    from ezoforge.eval.task_types.judged import Unit
    from ezoforge.eval.tasks import TASK_TYPES
    from ezoforge.models import load

    ev, cfg = recipe.eval, recipe.prefer
    judge = Judge(ev, cache, stack, lambda: load(ev.judge_model, None, model.device, model.dtype))
    rubric = TASK_TYPES["elyza100"]  # candidates are judged as ELYZA-tasks-100 answers, on its 1–5 rubric
    candidates: dict[str, list[dict]] = {}
    units = []
    for ins in instructions:
        texts = [(a["text"], "sample", a) for a in answers[ins.id]]
        texts += [(ins.reference, "reference", {})] if cfg.include_reference else []
        # No reference answer in the judge's prompt: the synthesized response is itself a candidate.
        task = OpenTask(f"prefer/{ins.id}", ins.prompt, None, None)
        candidates[ins.id] = [{"instruction_id": ins.id, "doc_id": ins.doc_id, "candidate": k, "source": source,
                               "text": text, "finish_reason": extra.get("finish_reason"),
                               "completion_tokens": extra.get("completion_tokens")}
                              for k, (text, source, extra) in enumerate(texts)]
        units += [Unit(task, k, 1, j, (text,), rubric) for k, (text, _, _) in enumerate(texts)
                  for j in range(ev.judgments)]
    started = time.perf_counter()
    judged = judge.judge_all(units, f"{model.name}+sft") if units else []
    counts.update(judge_sent=judge.sent, judge_cached=judge.cached,
                  judge_seconds=round(time.perf_counter() - started, 1))
    verdicts, of = [], {}
    for unit, v in zip(units, judged):
        row = {"instruction_id": unit.task.id.split("/", 1)[1], "candidate": unit.sample, **v}
        verdicts.append(row)
        of.setdefault((row["instruction_id"], unit.sample), []).append(row)
    for ins_id, cands in candidates.items():
        for c in cands:
            mine = of[ins_id, c["candidate"]]
            grades = [v["grade"] for v in mine]
            c["grade"] = None if None in grades else round(sum(grades) / len(grades), 4)
            c["reason"] = mine[0]["reason"]
    served = sorted({v["judge_served"] for v in verdicts if v["judge_served"]})
    return candidates, verdicts, served


def summary(folder: Path) -> str:
    """The stage in one sentence, from its finished folder: what `ezo prefer` prints and the run report shows."""
    p = done_info(folder).stats
    before, after = p.get("held_out_before"), p.get("held_out_after")
    held = f", held-out log-prob margin {before['logp_margin']} → {after['logp_margin']}" if before and after else ""
    return (f"{plural(p.get('pairs'), 'preference pair')} from {plural(p.get('instructions'), 'instruction')} "
            f"(margins {p.get('margin_histogram')}), DPO {plural(p.get('dpo_steps'), 'step')}, loss "
            f"{fmt(p.get('dpo_loss_first'))} → {fmt(p.get('dpo_loss_last'))}{held}")
