"""Held-out perplexity (`ppl:PATH`, rows `{id, text}`): token-weighted over every paragraph, from the model's own
forward pass (likelihood.py)."""
from __future__ import annotations

from typing import Any

from ezoforge.errors import RecordError
from ezoforge.eval import metrics
from ezoforge.eval.items import Passage
from ezoforge.eval.task_types.base import Context, EvalTask, Scoring, row_key
from ezoforge.metric_catalogue import Metric
from ezoforge.records import require

PERPLEXITY = Metric("Perplexity on held-out text (lower is better)", "held-out perplexity (lower is better)",
                    "perplexity", False, 2)


def _passages(items: list[Passage], ctx: Context) -> list[dict]:
    from ezoforge.cache import cached, request_key
    from ezoforge.eval.likelihood import passage_nll

    cfg = ctx.recipe.eval
    keys = [request_key(kind="ppl", model=ctx.fp, text=p.text, window=cfg.ppl_window) for p in items]
    values = cached(ctx.cache, keys, lambda idx: [{"nll": nll, "tokens": n} for nll, n in passage_nll(
        ctx.models.loaded, [items[i].text for i in idx], cfg.ppl_window)], cfg.generation.batch_size, "passages",
        ctx.counts)
    return [{"id": p.id, **v} for p, v in zip(items, values)]


class Perplexity(Scoring):
    loads_model = True
    metrics = {"perplexity": PERPLEXITY}
    summary_keys = ("perplexity", "ppl_tokens")

    def answer(self, ctx: Context) -> None:
        self.passages = [p for s in self.suites for p in _passages(s.items, ctx)]

    def figures(self, ctx: Context) -> dict:
        passages = self.passages
        tokens = sum(p["tokens"] for p in passages)
        if passages and not tokens:
            raise RecordError("ppl: every paragraph is a single token; nothing to predict")
        return {"perplexity": metrics.rounded(metrics.perplexity(sum(p["nll"] for p in passages), tokens))
                if passages else None, "ppl_tokens": tokens, "n_passages": len(passages)}

    def words(self, report: dict) -> list[tuple[str, str]]:
        if report.get("perplexity") is None:
            return []
        return [(PERPLEXITY.label, f"{PERPLEXITY.shown(report['perplexity'])} over {report['ppl_tokens']:,} tokens")]


class Ppl(EvalTask):
    kind = "ppl"
    scoring = Perplexity

    def item(self, where: str, lineno: int, row: dict[str, Any], position: int) -> Passage:
        return Passage(f"ppl/{row_key(where, lineno, row, 'id', position)}", require(where, lineno, row, "text"))
