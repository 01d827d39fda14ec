"""JCommonsenseQA (JGLUE): five-way choice questions, scored by the model's log-likelihood of each choice
(likelihood.py); accuracy under both normalizations, the recipe's (eval.jcqa_normalization) as the headline."""
from __future__ import annotations

from typing import Any

from ezoforge.errors import RecordError
from ezoforge.eval import metrics
from ezoforge.eval.items import ChoiceItem
from ezoforge.eval.task_types.base import Context, EvalTask, Scoring, row_key
from ezoforge.metric_catalogue import Metric
from ezoforge.records import require

ACCURACY = Metric("JCommonsenseQA accuracy", "JCommonsenseQA accuracy", "JCQA accuracy", True, 1, percent=True)


def _predictions(items: list[ChoiceItem], ctx: Context) -> list[dict]:
    from ezoforge.cache import cached, request_key
    from ezoforge.eval.likelihood import choice_logprobs, jcqa_prompt, pick

    cfg, system = ctx.recipe.eval, ctx.recipe.model.system_prompt
    keys = [request_key(kind="choices", model=ctx.fp, system=system, prompt=jcqa_prompt(it), choices=it.choices)
            for it in items]
    values = cached(ctx.cache, keys, lambda idx: [{"logprobs": lp} for lp in choice_logprobs(
        ctx.models.scorer, system, [items[i] for i in idx])], cfg.generation.batch_size, "choices", ctx.counts)
    return [{"id": it.id, "pred": pick(v["logprobs"], it.choices, cfg.jcqa_normalization), "label": it.label,
             "pred_per_char": pick(v["logprobs"], it.choices, "per_char"), "pred_sum": pick(v["logprobs"], it.choices, "sum"),
             "logprobs": v["logprobs"]} for it, v in zip(items, values)]


def _accuracy(preds: list[dict], field: str) -> float | None:
    return metrics.rounded(sum(p[field] == p["label"] for p in preds) / len(preds)) if preds else None


class Choices(Scoring):
    loads_model = True
    metrics = {"accuracy": ACCURACY}
    summary_keys = ("accuracy", "n_choice_items")

    def answer(self, ctx: Context) -> None:
        self.preds = [p for s in self.suites for p in _predictions(s.items, ctx)]

    def figures(self, ctx: Context) -> dict:
        preds, normalization = self.preds, ctx.recipe.eval.jcqa_normalization
        return {"accuracy": _accuracy(preds, "pred"), "accuracy_normalization": normalization if preds else None,
                "accuracy_by_normalization": {"sum": _accuracy(preds, "pred_sum"),
                                              "per_char": _accuracy(preds, "pred_per_char")} if preds else None,
                "n_choice_items": len(preds)}

    def files(self) -> dict[str, list[dict]]:
        return {"predictions.jsonl": self.preds}

    def words(self, report: dict) -> list[tuple[str, str]]:
        if report.get("accuracy") is None:
            return []
        return [(ACCURACY.label, f"{ACCURACY.shown(report['accuracy'])} of {report['n_choice_items']} items "
                                 f"({report['accuracy_normalization']} scoring)")]


class Jcqa(EvalTask):
    kind = "jcqa"
    scoring = Choices
    hub = ("sbintuitions/JCommonsenseQA", "validation")

    def item(self, where: str, lineno: int, row: dict[str, Any], position: int) -> ChoiceItem:
        choices = tuple(require(where, lineno, row, f"choice{i}") for i in range(5))
        if not all(c.strip() for c in choices):
            raise RecordError(f"{where}:{lineno}: an empty choice cannot be scored")
        label = require(where, lineno, row, "label", int)
        if not 0 <= label < 5:
            raise RecordError(f"{where}:{lineno}: field 'label' must be 0..4, got {label}")
        return ChoiceItem(f"jcqa/{row_key(where, lineno, row, 'q_id', position)}",
                          require(where, lineno, row, "question"), choices, label)
