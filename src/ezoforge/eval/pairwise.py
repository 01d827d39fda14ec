"""`ezo eval compare A B --pairwise`: which of two models answered each task better, asked of the judge head to head.

The protocol follows MT-Bench's pairwise judging (and flexeval's): the judge reads the question, the reference where
there is one, and two answers as アシスタントA and B, and names a winner or a tie. Every pair is asked in both orders;
a pair whose two orders disagree counts as a tie, so the judge's preference for a position cancels. Sample i of one
eval meets sample i of the other, on turn 1 of each task both answered. The win rate of B over the baseline A is
(wins + ties / 2) / pairs, with a percentile bootstrap interval over tasks.
"""
from __future__ import annotations

import json
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from rich.progress import Progress

from ezoforge.cache import RequestCache
from ezoforge.errors import ConfigError, EzoError
from ezoforge.eval.compare import judge_identity
from ezoforge.eval.eval_report import pairwise_words
from ezoforge.eval.judge_client import Judge
from ezoforge.eval.judge_prompt import Verdict, converse, json_objects
from ezoforge.eval.settings import EvalConfig
from ezoforge.logs import console
from ezoforge.models import cache_root, load
from ezoforge.records import read_eval_report, read_jsonl, write_json, write_jsonl
from ezoforge.remote import RemoteError
from ezoforge.stage import Stage

PROMPT_VERSION = "ezo-pairwise-ja-v1"
# The verdict's scale: its index in WINNERS (a Verdict carries it as its grade).
WINNERS = ("tie", "A", "B")

SYSTEM = ("あなたは日本語の回答を公正に比較する評価者です。回答が示された順序や長さに左右されず、"
          "指示された形式だけで出力してください。")

TEMPLATE = """次の問題に対する2つのアシスタントの回答を比べ、どちらがより良い回答かを判定してください。

# 問題
{question}

# 正解例
{reference}

# アシスタントAの回答
{a}

# アシスタントBの回答
{b}

# 判定の基準
正確さ、指示に従っているか、有用さ、日本語の自然さで比べる。日本語以外で回答している場合は不利とする。
回答の順序や長さで判断しない。優劣をつけられない場合は引き分け（tie）とする。

理由を簡潔に述べてから判定し、次の形式の JSON オブジェクト1つだけを出力してください（<…> は書き換える）。
{{"reason": "<判定の理由>", "winner": "<A、B、tie のいずれか>"}}"""

REASK = ("出力を読み取れませんでした（{problem}）。"
         '{{"reason": "<判定の理由>", "winner": "<A、B、tie のいずれか>"}} の形式の JSON オブジェクト1つだけを出力してください。')


def messages(question: str, reference: str | None, a: str, b: str) -> list[dict[str, str]]:
    user = TEMPLATE.format(question=question, reference=reference or "（なし）", a=a, b=b)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def response_format(reason_max_chars: int) -> dict:
    schema = {"type": "object", "additionalProperties": False, "required": ["reason", "winner"],
              "properties": {"reason": {"type": "string", "maxLength": reason_max_chars},
                             "winner": {"type": "string", "enum": ["A", "B", "tie"]}}}
    return {"type": "json_schema", "json_schema": {"name": "pairwise_verdict", "schema": schema, "strict": False}}


_SAID = {"a": "A", "b": "B", "tie": "tie", "draw": "tie", "引き分け": "tie", "c": "tie"}
_BRACKETED = re.compile(r"\[\[\s*([ABC])\s*\]\]")  # MT-Bench's own verdict format: [[A]], [[B]], [[C]] (a tie)


def parse_winner(raw: str) -> Verdict:
    """The winner as a Verdict whose grade is its index in WINNERS; None where the reply names none or several."""
    text = unicodedata.normalize("NFKC", raw).strip()
    named = {(_SAID.get(obj["winner"].strip().lower()), str(obj.get("reason", "")).strip())
             for obj in json_objects(text) if isinstance(obj.get("winner"), str)}
    if not named:
        named = {(_SAID[m.lower()], "") for m in _BRACKETED.findall(text)}
    winners = {w for w, _ in named}
    if not winners:
        return Verdict(None, "", "no winner found")
    if len(winners) > 1 or None in winners:
        return Verdict(None, "", f"no single winner ({sorted(str(w) for w in winners)})")
    winner = winners.pop()
    return Verdict(WINNERS.index(winner), next(r for w, r in named if w == winner))


def _answers(folder: Path) -> tuple[dict, dict[tuple[str, int], dict]]:
    report_path, answers_path = folder / "report.json", folder / "answers.jsonl"
    if not report_path.is_file() or not answers_path.is_file():
        raise EzoError(f"{folder}: no report.json and answers.jsonl (not an `ezo eval` output with judged tasks)")
    report = read_eval_report(report_path)
    rows = {(r["task_id"], r.get("sample", 0)): r for _, r in read_jsonl(answers_path) if r.get("turn", 1) == 1}
    return report, rows


def _bootstrap(per_task: list[tuple[float, int]], samples: int, seed: int) -> list[float]:
    """Percentile 95% interval of the pair-weighted win rate over tasks resampled with replacement."""
    import numpy as np

    points = np.array([p for p, _ in per_task], dtype=float)
    pairs = np.array([n for _, n in per_task], dtype=float)
    picks = np.random.default_rng(seed).integers(0, len(per_task), size=(samples, len(per_task)))
    rates = points[picks].sum(axis=1) / pairs[picks].sum(axis=1)
    return [round(float(x), 4) for x in np.percentile(rates, [2.5, 97.5])]


# The eval settings that shape a verdict (the rest, concurrency, retries, timeouts, the cache's path, are operational).
SHAPING = ("judge_url", "judge_model", "judge_max_tokens", "judge_temperature", "judge_structured",
           "judge_reason_max_chars", "judge_reasks", "bootstrap_samples", "bootstrap_seed")


def run(dirs: list[Path], cfg: EvalConfig, out: Path, force: bool = False) -> dict:
    """Each later eval against the first, head to head, into the stage folder `out` (pairwise.json, verdicts.jsonl);
    a rerun with the same evals and judge is a no-op, a killed one asks only what the cache lacks."""
    if len(dirs) < 2:
        raise EzoError("--pairwise needs at least two eval folders: the baseline first")
    if not cfg.judge_model:
        raise ConfigError("--pairwise needs a judge: --judge-url and --judge-model, or eval.judge_* in the recipe")
    runs = [(Path(d), *_answers(Path(d))) for d in dirs]
    graded = [(folder, judge_identity(report)) for folder, report, _ in runs if report.get("judge")]
    if any(who != graded[0][1] for _, who in graded):
        other = next(f for f, who in graded if who != graded[0][1])
        raise ConfigError(f"{graded[0][0]} was judged by {graded[0][1]} but {other} by "
                          f"{dict(graded)[other]}: evals graded by different judges are not compared")
    stage = Stage("pairwise", out, {"eval": {k: getattr(cfg, k) for k in SHAPING}, "prompt_version": PROMPT_VERSION},
                  inputs=[folder for folder, _, _ in runs])
    if (finished := stage.start(force)) is not None:
        return finished
    with stage.claimed():
        return stage.finish(_compare(runs, cfg, stage.folder))


def _compare(runs: list[tuple[Path, dict, dict]], cfg: EvalConfig, out: Path) -> dict:
    (base_dir, _, base), results, rows_out = runs[0], [], []
    cache = RequestCache(cfg.cache or cache_root() / "eval-requests.sqlite")
    with ExitStack() as stack:
        stack.callback(cache.close)
        judge = Judge(cfg, cache, stack, lambda: load(cfg.judge_model))  # a `local` judge's model
        for folder, _, other in runs[1:]:
            keys = sorted(set(base) & set(other))
            if not keys:
                raise EzoError(f"{folder} and {base_dir}: no task answered in both")
            outcomes = _judge_pairs(judge, cfg, [(base[k], other[k]) for k in keys])
            rows_out += [{"baseline": str(base_dir), "other": str(folder), "task_id": k[0], "sample": k[1], **o}
                         for k, o in zip(keys, outcomes)]
            results.append(_summary(folder, keys, outcomes, cfg))
    result = {"baseline": str(base_dir), "judge": {"model": cfg.judge_model, "url": cfg.judge_url,
                                                    "prompt_version": PROMPT_VERSION,
                                                    "served": sorted({r["served"] for r in rows_out if r["served"]})},
              "against": results}
    write_jsonl(out / "verdicts.jsonl", rows_out)
    write_json(out / "pairwise.json", result)
    return result


def _judge_pairs(judge: Judge, cfg: EvalConfig, pairs: list[tuple[dict, dict]]) -> list[dict]:
    """Each pair asked in both orders: the outcome for the later eval (win, loss, tie; None where a verdict failed)."""
    fmt = response_format(cfg.judge_reason_max_chars) if cfg.judge_structured else None
    said: dict[int, str | None] = {}

    def ask(slot: int, first: dict, second: dict) -> Verdict:
        def send(msgs):
            reply = judge.ask(msgs, 0, PROMPT_VERSION, fmt)
            said[slot] = reply.get("model")
            return reply["text"]

        try:
            return converse(send, messages(first["prompt"], first.get("reference"), first["answer"],
                                           second["answer"]), cfg.judge_reasks, parse_winner, REASK)
        except RemoteError as e:
            return Verdict(None, "", f"judge request failed: {e}")

    jobs = [(i, order) for i in range(len(pairs)) for order in (0, 1)]
    with ThreadPoolExecutor(cfg.concurrency) as pool, Progress(console=console) as progress:
        bar = progress.add_task("pairwise", total=len(jobs))

        def one(job):
            i, order = job
            base, other = pairs[i]
            verdict = ask(2 * i + order, *((base, other) if order == 0 else (other, base)))
            progress.advance(bar)
            return verdict

        verdicts = list(pool.map(one, jobs))
    outcomes = []
    for i in range(len(pairs)):
        # For the later eval: in order 0 it is B, in order 1 it is A.
        seen = [_for_later(verdicts[2 * i], "B"), _for_later(verdicts[2 * i + 1], "A")]
        failed = [v.error for v in verdicts[2 * i: 2 * i + 2] if v.grade is None]
        outcome = None if failed else seen[0] if seen[0] == seen[1] else "tie"
        outcomes.append({"outcome": outcome, "orders": seen, "disagree": not failed and seen[0] != seen[1],
                         "reasons": [v.reason for v in verdicts[2 * i: 2 * i + 2]], "error": "; ".join(failed) or None,
                         "served": said.get(2 * i) or said.get(2 * i + 1)})
    return outcomes


def _for_later(verdict: Verdict, later_is: str) -> str | None:
    if verdict.grade is None:
        return None
    winner = WINNERS[verdict.grade]
    return "tie" if winner == "tie" else "win" if winner == later_is else "loss"


def _summary(folder: Path, keys: list[tuple[str, int]], outcomes: list[dict], cfg: EvalConfig) -> dict:
    per_task: dict[str, dict[str, int]] = {}
    for (task, _), o in zip(keys, outcomes):
        counts = per_task.setdefault(task, {"win": 0, "tie": 0, "loss": 0, "failed": 0})
        counts[o["outcome"] or "failed"] += 1
    wins, ties, losses = (sum(c[k] for c in per_task.values()) for k in ("win", "tie", "loss"))
    pairs = wins + ties + losses
    scored = [(c["win"] + c["tie"] / 2, c["win"] + c["tie"] + c["loss"]) for c in per_task.values()
              if c["win"] + c["tie"] + c["loss"]]
    return {"other": str(folder), "pairs": pairs, "wins": wins, "ties": ties, "losses": losses,
            "failed": sum(c["failed"] for c in per_task.values()),
            "win_rate": round((wins + ties / 2) / pairs, 4) if pairs else None,
            "ci95": _bootstrap(scored, cfg.bootstrap_samples, cfg.bootstrap_seed) if scored else None,
            "disagreements": sum(o["disagree"] for o in outcomes),
            "per_task": per_task}


def summary(folder: Path) -> str:
    """The stage in one sentence, from its finished folder: what `ezo eval compare --pairwise` prints and the run report shows."""
    return pairwise_words(json.loads((Path(folder) / "pairwise.json").read_text(encoding="utf-8")))
