"""Open task types: answered by generation, graded by an LLM judge on the type's scale, and scored with chrF where
an item has a reference answer.

Every open suite of an eval is answered in one batch, judged in one round and averaged into one mean (and per
suite when there are several); each type says how its answers are judged and may add figures of its own.
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

from ezoforge.eval import metrics
from ezoforge.eval.items import OpenTask
from ezoforge.eval.judge_prompt import Verdict
from ezoforge.eval.task_types.base import Context, EvalTask, Scoring, Suite, prompt_versions
from ezoforge.metric_catalogue import Metric, grade_words
from ezoforge.text import japanese_ratio

MEAN_GRADE = Metric("Mean grade (LLM judge)", "mean grade (LLM judge)", "mean grade", True, 2)
CHRF = Metric("chrF vs the references (0–100)", "chrF", "chrF", True, 1)
# An answer is mainly Japanese when at least this share of its letters are kana or kanji (text.japanese_ratio): an
# assistant tuned for Japanese should not drift into English, whatever grade the judge gives.
MAINLY_JAPANESE = 0.5
JAPANESE_ANSWERS = Metric(f"Answers mainly in Japanese (≥ {MAINLY_JAPANESE:.0%} of letters kana or kanji)",
                          "answers in Japanese", "Japanese answers", True, 0, percent=True)


def japanese_answers(answers: list[str]) -> float | None:
    """The share of answers that are mainly Japanese (None without answers)."""
    return metrics.rounded(sum(japanese_ratio(a) >= MAINLY_JAPANESE for a in answers) / len(answers)) \
        if answers else None


def grade_summary(judgements: list[dict], n_tasks: int, judged: bool, allow_partial: bool, samples: int,
                  seed: int, scale: tuple[int, int] | None = (1, 5)) -> dict:
    """Counts, status and — only when no judgement failed, or failures are allowed — the mean over tasks of each
    task's mean grade, with a bootstrap-over-tasks interval. `scale` None: grades on different scales, no mean."""
    grades = [j["grade"] for j in judgements if j["grade"] is not None]
    per_task = {t: g for t, g in metrics.task_grades(judgements).items() if g}
    n_failed = sum(j["error"] is not None for j in judgements)
    if not n_tasks:
        status = "complete"  # nothing to judge in this run (e.g. only jcqa or ppl)
    elif not judged:
        status = "not_judged"
    elif n_failed and (not allow_partial or not grades):
        status = "failed"
    else:
        status = "partial" if n_failed else "complete"
    usable = status in ("complete", "partial") and bool(per_task) and scale is not None
    mean, ci = metrics.mean_over_tasks(per_task, samples, seed) if usable else (None, None)
    spreads = [metrics.task_spread(g) for g in per_task.values()]
    stds = [s["std"] for s in spreads if s["std"] is not None]
    return {
        "status": status, "partial": status == "partial",
        "n_scored": len(grades), "n_failed": n_failed, "n_tasks_scored": len(per_task),
        "mean_grade": metrics.rounded(mean), "ci95": [metrics.rounded(x) for x in ci] if ci else None,
        "scale": list(scale) if scale else None,
        "grade_counts": {str(g): n for g, n in sorted(Counter(grades).items())},
        # How much a task's grades vary over its samples x judgments (x turns): the mean and largest spread.
        "task_spread": {"mean_std": metrics.rounded(sum(stds) / len(stds)),
                        "max_range": metrics.rounded(max(s["max"] - s["min"] for s in spreads))} if stds else None,
    }


def protocol_words(report: dict) -> str | None:
    """"3 samples × 3 judgments per task (temperature 0.7, judge 0.7)" for a judged report."""
    p = report.get("protocol")
    if not p or not report.get("judge"):
        return None
    return (f"{p['samples']} sample(s) × {p['judgments']} judgment(s) per task (generation temperature "
            f"{p['temperature']:g}, judge temperature {p['judge_temperature']:g}); a task's grade is their mean, the "
            "interval a bootstrap over tasks")


def _answers(tasks: list[OpenTask], ctx: Context) -> list[dict]:
    """One row per task, sample and turn, in that order. A later turn is asked in the conversation that holds
    the sample's own earlier answers, as MT-Bench asks its second turn."""
    from ezoforge.cache import answer_key, cached
    from ezoforge.infer.generate import Sampling

    recipe, models = ctx.recipe, ctx.models
    fp = models.answer_identity(ctx.fp)
    g, system, n_samples = recipe.eval.generation, recipe.model.system_prompt, recipe.eval.samples
    if system is None:  # sent all the same, so that no server or chat-template default stands in for it
        system = models.default_system()
    convs = {(i, s): [{"role": "system", "content": system}, {"role": "user", "content": t.prompt}]
             for i, t in enumerate(tasks) for s in range(n_samples)}
    said: dict[tuple[int, int, int], dict] = {}
    for turn in range(1, max((len(t.turns) for t in tasks), default=0) + 1):
        idx = [i for i, t in enumerate(tasks) if len(t.turns) >= turn]
        for s in range(n_samples):
            # A seed per sample index: samples differ from each other, and each is reproducible on its own.
            sampling = replace(Sampling.from_config(g), seed=g.seed + s)
            if turn > 1:
                for i in idx:
                    convs[i, s] = convs[i, s] + [{"role": "assistant", "content": said[i, s, turn - 1]["text"]},
                                                 {"role": "user", "content": tasks[i].turns[turn - 1]}]
            keys = [answer_key(fp, convs[i, s], sampling, s) for i in idx]

            def compute(chosen: list[int], idx=idx, s=s, sampling=sampling) -> list[dict]:
                outs = models.generator.complete([convs[idx[k], s] for k in chosen], sampling)
                return [c.cached() for c in outs]

            for i, value in zip(idx, cached(ctx.cache, keys, compute, g.batch_size, "answers", ctx.counts)):
                said[i, s, turn] = value
    rows = [{"task_id": t.id, "sample": s, "turn": turn, "prompt": t.turns[turn - 1],
             "reference": t.reference if turn == 1 else None, **said[i, s, turn]}
            for i, t in enumerate(tasks) for s in range(n_samples) for turn in range(1, len(t.turns) + 1)]
    refs = [r for r in rows if r["reference"] is not None]
    per = iter(metrics.chrf([r["text"] for r in refs], [r["reference"] for r in refs])[1] if refs else [])
    return [{**{k: v for k, v in r.items() if k != "text"}, "answer": r["text"],
             "chrf": next(per) if r["reference"] is not None else None} for r in rows]


class Judged(Scoring):
    metrics = {"mean_grade": MEAN_GRADE, "chrf": CHRF, "japanese_answers": JAPANESE_ANSWERS}
    summary_keys = ("mean_grade", "ci95", "chrf", "japanese_answers")
    contaminable = True

    def answer(self, ctx: Context) -> None:
        self.rows = _answers(self.items, ctx)
        self.judgements: list[dict] = []

    def grade(self, ctx: Context) -> None:
        judge = ctx.judge
        if judge is None:
            return
        started = time.perf_counter()
        if self.rows:
            self.judgements = judge.judge_all(self._units(ctx.recipe.eval.judgments), ctx.model_name)
        ctx.counts.update(judge_sent=judge.sent, judge_cached=judge.cached,
                          judge_seconds=round(time.perf_counter() - started, 1))

    def _units(self, judgments: int) -> list:
        """Every verdict to get, in row order: `judgments` of each answer, each seeing the sample's answers so far."""
        by_id = {t.id: (t, s.task_type) for s in self.suites for t in s.items}
        so_far: dict[tuple[str, int], list[str]] = {}
        units = []
        for r in self.rows:
            answers = so_far.setdefault((r["task_id"], r["sample"]), [])
            answers.append(r["answer"])
            task, judged_as = by_id[r["task_id"]]
            units += [Unit(task, r["sample"], r["turn"], j, tuple(answers), judged_as) for j in range(judgments)]
        return units

    def _judged(self, ctx: Context) -> bool:
        return ctx.recipe.eval.judge_model is not None and bool(self.rows)

    def _suite_figures(self, suites: list[Suite], ctx: Context) -> dict:
        """The figures over these suites' tasks: a mean grade only when they share one scale."""
        cfg = ctx.recipe.eval
        ids = {t.id for s in suites for t in s.items}
        refs = [r for r in self.rows if r["task_id"] in ids and r["reference"] is not None]
        score = metrics.chrf([r["answer"] for r in refs], [r["reference"] for r in refs])[0] if refs else None
        graded = [j for j in self.judgements if j["task_id"] in ids]
        scales = {s.task_type.scale for s in suites}
        summary = grade_summary(graded, len(ids), self._judged(ctx), cfg.allow_partial, cfg.bootstrap_samples,
                                cfg.bootstrap_seed, scales.pop() if len(scales) == 1 else None)
        return {"n_tasks": len(ids), **summary, "chrf": metrics.rounded(score),
                "japanese_answers": japanese_answers([r["answer"] for r in self.rows if r["task_id"] in ids])}

    def header(self, ctx: Context) -> dict:
        judged = self._judged(ctx)
        return {"judge": self._judge_section(ctx) if judged else None,
                "prompt_version": prompt_versions(self.suites) if judged else None}

    def _judge_section(self, ctx: Context) -> dict:
        """The judge as asked and as it answered: the `model` each response reported and its system fingerprints."""
        cfg = ctx.recipe.eval
        served = sorted({j["judge_served"] for j in self.judgements if j["judge_served"]})
        prints = sorted({j["system_fingerprint"] for j in self.judgements if j["system_fingerprint"]})
        notes = ([f"the judge answered as {len(served)} different models: {', '.join(served)}"]
                 if len(served) > 1 else []) \
            + ([f"the judge reported {len(prints)} system fingerprints: {', '.join(prints)}"] if len(prints) > 1 else [])
        return {"model": cfg.judge_model, "url": cfg.judge_url, "served": served, "system_fingerprints": prints,
                "prompt_version": prompt_versions(self.suites), "temperature": cfg.judge_temperature,
                "mixed": len(served) > 1, "notes": notes}

    def figures(self, ctx: Context) -> dict:
        return {**self._suite_figures(self.suites, ctx), "chrf_signature": metrics.chrf_signature()}

    def breakdowns(self, ctx: Context) -> dict:
        cfg, judged = ctx.recipe.eval, self._judged(ctx)
        out = {"by_suite": {s.kind: self._suite_figures([s], ctx) for s in self.suites}
               if len(self.suites) > 1 else None}
        for t in self.types:
            if t.breakdown_key:
                suite = next((s for s in self.suites if s.task_type is t), None)
                ids = {it.id for it in suite.items} if suite else set()
                out[t.breakdown_key] = t.breakdown(suite.items, [j for j in self.judgements if j["task_id"] in ids],
                                                   (cfg.bootstrap_samples, cfg.bootstrap_seed)) \
                    if judged and suite else None
        out["per_task"] = [{"task_id": t, **metrics.task_spread(g)}
                           for t, g in metrics.task_grades(self.judgements).items() if g]
        return out

    def files(self) -> dict[str, list[dict]]:
        return {"answers.jsonl": self.rows, "judgements.jsonl": self.judgements}

    def words(self, report: dict) -> list[tuple[str, str]]:
        if not report.get("n_tasks"):
            return []
        scale = report.get("scale")
        out = [("Open tasks", f"{report['n_tasks']}"),
               (f"{MEAN_GRADE.label}, {scale[0]}–{scale[1]}" if scale else MEAN_GRADE.label, grade_words(report))]
        if protocol_words(report):
            out.append(("Protocol", protocol_words(report)))
        if report.get("task_spread"):
            spread = report["task_spread"]
            out.append(("Spread within a task", f"mean std {spread['mean_std']:.2f}, widest min–max range "
                                                 f"{spread['max_range']:.2f}"))
        for kind, sub in (report.get("by_suite") or {}).items():
            if sub.get("n_tasks"):
                out.append((f"{kind} (judge, {sub['scale'][0]}–{sub['scale'][1]})", grade_words(sub)))
        for t in self.types:
            if t.breakdown_key:
                out += t.breakdown_words(report.get(t.breakdown_key))
        if report.get("chrf") is not None:
            out.append((CHRF.label, CHRF.shown(report["chrf"])))
        if report.get("japanese_answers") is not None:
            out.append((JAPANESE_ANSWERS.label, JAPANESE_ANSWERS.shown(report["japanese_answers"])))
        return out


class JudgedTask(EvalTask):
    """An open task type: its judge prompt (`prompt_version`), grade scale and published benchmark name, how one
    answer is judged, and any figures of its own (report.json's `breakdown_key`)."""
    scoring = Judged
    prompt_version: ClassVar[str]
    scale: ClassVar[tuple[int, int]]
    benchmark: ClassVar[str]  # its published name, where a run is placed beside published figures (anchors.py)
    breakdown_key: ClassVar[str | None] = None

    def response_format(self, reason_max_chars: int) -> dict | None:
        """The response_format its verdicts may be held to (eval.judge_structured); None: free text."""
        return None

    def verdict(self, ask: Callable[[list[dict[str, str]]], str], unit, reasks: int) -> Verdict:
        """The verdict on `unit` (a `Unit`, below): `ask` sends messages and returns the judge's text."""
        raise NotImplementedError

    def prompt_name(self, unit) -> str | None:
        """Which of its judge prompts judged `unit`, when it has several."""
        return None

    def breakdown(self, tasks: list[OpenTask], judgements: list[dict], boot: tuple[int, int]) -> dict:
        """Its own figures from its tasks' verdicts (`boot`: bootstrap samples and seed)."""
        raise NotImplementedError

    def breakdown_words(self, figures: dict | None) -> list[tuple[str, str]]:
        """The eval report's lines for its own figures."""
        return []


@dataclass(frozen=True)
class Unit:
    """One verdict to get: judgment `judgment` of the model's answer to `turn` in sample `sample` of `task`, judged
    as the open task type `judged_as` judges (its prompt, version and verdict parsing)."""
    task: OpenTask
    sample: int
    turn: int
    judgment: int
    answers: tuple[str, ...]  # the sample's answers to turns 1..turn
    judged_as: JudgedTask
