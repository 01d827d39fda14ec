"""Scores that need no judge (chrF, accuracy, perplexity) and seeded bootstrap intervals."""
from __future__ import annotations

import math

# chrF as sacrebleu defines it: character 6-grams, no word n-grams (not chrF++), beta 2, whitespace ignored.
# Character n-grams need no Japanese word segmentation, so the score is tokenizer-free and deterministic.
CHRF_SETTINGS = {"char_order": 6, "word_order": 0, "beta": 2}


def _chrf_metric():
    from sacrebleu.metrics import CHRF

    return CHRF(**CHRF_SETTINGS)


def chrf(hypotheses: list[str], references: list[str]) -> tuple[float, list[float]]:
    """(corpus chrF, per-answer chrF), on a 0-100 scale."""
    metric = _chrf_metric()
    corpus = metric.corpus_score(hypotheses, [references]).score
    return corpus, [metric.sentence_score(h, [r]).score for h, r in zip(hypotheses, references)]


def chrf_signature() -> str:
    metric = _chrf_metric()
    metric.corpus_score(["-"], [["-"]])  # sacrebleu fills in the signature (nrefs) only once it has scored
    return str(metric.get_signature())


def bootstrap_ci(values: list[float], samples: int, seed: int) -> list[float]:
    """Percentile 95% interval of the mean over `samples` seeded resamples of the values."""
    import numpy as np  # on first use: the task registry imports this module for `ezo --help`

    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(samples, len(v)))].mean(axis=1)
    return [float(x) for x in np.percentile(means, [2.5, 97.5])]


def task_grades(judgements: list[dict]) -> dict[str, list[float]]:
    """Each task's grades (over its samples x judgments x turns, failures left out), in first-seen task order."""
    out: dict[str, list[float]] = {}
    for j in judgements:
        out.setdefault(j["task_id"], [])
        if j["grade"] is not None:
            out[j["task_id"]].append(j["grade"])
    return out


def task_spread(grades: list[float]) -> dict:
    """How a task's grades vary: count, mean, sample standard deviation (None for one grade), min and max."""
    import numpy as np

    v = np.asarray(grades, dtype=float)
    return {"n": len(v), "mean": rounded(v.mean()), "std": rounded(v.std(ddof=1)) if len(v) > 1 else None,
            "min": rounded(v.min()), "max": rounded(v.max())}


def mean_over_tasks(per_task: dict[str, list[float]], samples: int, seed: int) -> tuple[float, list[float]]:
    """(the mean of the per-task means, its percentile 95% interval from a seeded bootstrap over tasks)."""
    import numpy as np

    means = [float(np.mean(g)) for g in per_task.values() if g]
    return float(np.mean(means)), bootstrap_ci(means, samples, seed)


def paired_bootstrap(base: list[float], other: list[float], samples: int, seed: int) -> dict:
    """Mean of other - base over the same tasks, its 95% interval, and the share of resamples where other
    is not better (a one-sided bootstrap p-value for "other beats base")."""
    import numpy as np

    d = np.asarray(other, dtype=float) - np.asarray(base, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(samples, len(d)))].mean(axis=1)
    return {"n": len(d), "diff": float(d.mean()), "ci95": [float(x) for x in np.percentile(means, [2.5, 97.5])],
            "p_not_better": float((means <= 0).mean())}


def perplexity(nll_sum: float, n_tokens: int) -> float:
    return math.exp(nll_sum / n_tokens)


def rounded(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)
