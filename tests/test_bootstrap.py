"""The seeded bootstrap intervals against the exact bootstrap distribution, computed independently.

Resampling n values with replacement makes the resampled sum a sum of n independent uniform draws from the values,
so its exact distribution is an n-fold convolution; many seeded resamples must land on its quantiles."""
from collections import Counter

import pytest

from ezoforge.eval import metrics

SAMPLES = 20000
# Per-task grades of two runs over the same ten tasks: both spread over 1-5, the second mostly a little higher.
BASE = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
OTHER = [2, 2, 4, 4, 5, 2, 3, 3, 5, 4]


def exact_mean_distribution(values: list[int]) -> dict[float, float]:
    """P(mean of a resample = m) for every m, by convolving the one-draw distribution n times."""
    one = {v: c / len(values) for v, c in Counter(values).items()}
    sums = {0: 1.0}
    for _ in values:
        nxt: dict[int, float] = {}
        for s, p in sums.items():
            for v, q in one.items():
                nxt[s + v] = nxt.get(s + v, 0.0) + p * q
        sums = nxt
    return {s / len(values): p for s, p in sums.items()}


def quantile(dist: dict[float, float], q: float) -> float:
    """The smallest m with P(mean <= m) >= q."""
    total = 0.0
    for m in sorted(dist):
        total += dist[m]
        if total >= q:
            return m
    return max(dist)


def within_exact_band(got: float, dist: dict[float, float], q: float) -> bool:
    # 20000 resamples put the empirical CDF within ~0.001 of the exact one; 0.005 is a wide margin.
    return quantile(dist, q - 0.005) <= got <= quantile(dist, q + 0.005)


def test_paired_bootstrap_matches_the_exact_distribution_of_the_mean_difference():
    diffs = [o - b for b, o in zip(BASE, OTHER)]
    assert len(set(diffs)) > 1  # not the constant case every interval code gets right
    dist = exact_mean_distribution(diffs)
    got = metrics.paired_bootstrap(BASE, OTHER, SAMPLES, seed=0)
    assert got["n"] == 10 and got["diff"] == pytest.approx(sum(diffs) / 10)
    low, high = got["ci95"]
    assert within_exact_band(low, dist, 0.025) and within_exact_band(high, dist, 0.975), (got, dist)
    assert 0 <= low < got["diff"] < high
    exact_p = sum(p for m, p in dist.items() if m <= 0)
    assert got["p_not_better"] == pytest.approx(exact_p, abs=0.01)
    # Pairing matters: resampling the runs independently would give a far wider interval than the paired one.
    unpaired = metrics.bootstrap_ci(OTHER, SAMPLES, 1)[1] - metrics.bootstrap_ci(BASE, SAMPLES, 2)[0]
    assert high < unpaired


def test_paired_bootstrap_is_seeded_and_swapping_the_runs_mirrors_it():
    a = metrics.paired_bootstrap(BASE, OTHER, 2000, seed=5)
    assert a == metrics.paired_bootstrap(BASE, OTHER, 2000, seed=5)
    assert a["p_not_better"] != metrics.paired_bootstrap(BASE, OTHER, 2000, seed=6)["p_not_better"]
    swapped = metrics.paired_bootstrap(OTHER, BASE, SAMPLES, seed=0)
    assert swapped["diff"] == pytest.approx(-a["diff"])
    dist = exact_mean_distribution([b - o for b, o in zip(BASE, OTHER)])
    assert within_exact_band(swapped["ci95"][0], dist, 0.025) and within_exact_band(swapped["ci95"][1], dist, 0.975)


def test_bootstrap_ci_of_the_mean_matches_the_exact_distribution():
    grades = [1, 1, 2, 3, 3, 3, 4, 5, 5, 2, 4, 1]
    dist = exact_mean_distribution(grades)
    low, high = metrics.bootstrap_ci(grades, SAMPLES, seed=0)
    assert within_exact_band(low, dist, 0.025) and within_exact_band(high, dist, 0.975), (low, high)
    assert low < sum(grades) / len(grades) < high
