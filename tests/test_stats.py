"""Paired statistics, random-head nulls and agreement measures, against hand computations and scipy."""

from __future__ import annotations

import importlib
import itertools
import math

import numpy as np
import pytest
from scipy.stats import binomtest, pearsonr, wilcoxon

from safetyheads.adapters import HeadGeometry
from safetyheads.stats import (
    PairedComparison,
    StatsError,
    auroc,
    describe,
    holm,
    layer_matched_heads,
    layer_matched_random_heads,
    mcnemar_exact,
    paired_bootstrap,
    paired_comparison,
    point_biserial,
    rank_among,
    uniform_random_heads,
    wilson_interval,
)

GEOM = HeadGeometry(model_type="toy", n_layers=4, n_heads=6, n_kv_heads=2, head_dim=8)


# --------------------------------------------------------------------------- McNemar


def test_mcnemar_hand_cases():
    """Exact two-sided p = 2·P(X ≤ min(b, c)), X ~ Bin(b + c, 1/2), capped at 1."""
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2 · 0.5^5
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(3, 0) == pytest.approx(0.25)
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 0) == 1.0  # no discordant pairs: no evidence


@pytest.mark.parametrize("b,c", [(0, 1), (2, 7), (4, 11), (12, 13), (30, 10), (0, 40)])
def test_mcnemar_equals_scipy_exact_binomial_and_the_sum(b, c):
    n = b + c
    by_hand = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)
    assert mcnemar_exact(b, c) == pytest.approx(by_hand, rel=1e-12)
    assert mcnemar_exact(b, c) == pytest.approx(binomtest(b, n, 0.5).pvalue, rel=1e-12)


def test_mcnemar_rejects_bad_counts():
    for bad in [(-1, 2), (1.5, 2), (True, 1)]:
        with pytest.raises(StatsError):
            mcnemar_exact(*bad)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_constant_difference_has_a_point_interval():
    x = [0.0, 1.0, 2.0, 5.0]
    assert paired_bootstrap(x, [v + 0.5 for v in x], n_boot=500) == (0.5, 0.5, 0.5)


def test_bootstrap_two_pairs_matches_the_exact_resampling_distribution():
    """d = (0, 1): resampled means are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5 % and
    97.5 % quantiles are exactly 0 and 1."""
    diff, lo, hi = paired_bootstrap([0, 0], [0, 1], n_boot=4000, seed=1)
    assert (diff, lo, hi) == (0.5, 0.0, 1.0)


def test_bootstrap_moments_equal_the_enumerated_resampling_distribution():
    """All 5^5 resamples of five differences, enumerated: the bootstrap means' mean and standard
    deviation must match them (Monte Carlo error of 200k draws ≪ the 1 % tolerance)."""
    d = np.array([0.0, 1.0, 1.0, -1.0, 3.0])
    exact = np.array([d[list(ix)].mean() for ix in itertools.product(range(5), repeat=5)])
    rng = np.random.default_rng(7)
    x = rng.normal(size=5)
    diff, lo, hi = paired_bootstrap(x, x + d, n_boot=200_000, seed=3)
    assert diff == pytest.approx(d.mean())
    # the interval is the enumerated distribution's 2.5 / 97.5 % quantiles up to one grid step (0.2)
    assert lo == pytest.approx(np.quantile(exact, 0.025), abs=0.2 + 1e-9)
    assert hi == pytest.approx(np.quantile(exact, 0.975), abs=0.2 + 1e-9)
    assert exact.std() == pytest.approx(d.std() / math.sqrt(5))  # the enumeration itself is right


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=30), rng.normal(size=30)
    assert paired_bootstrap(x, y, seed=5) == paired_bootstrap(x, y, seed=5)
    assert paired_bootstrap(x, y, seed=5) != paired_bootstrap(x, y, seed=6)
    # the interval brackets the difference and narrows with the level
    d, lo, hi = paired_bootstrap(x, y, seed=5)
    _, lo80, hi80 = paired_bootstrap(x, y, seed=5, level=0.8)
    assert lo < lo80 < d < hi80 < hi


def test_bootstrap_rejects_bad_input():
    with pytest.raises(StatsError, match="length"):
        paired_bootstrap([1, 2], [1])
    with pytest.raises(StatsError, match="empty"):
        paired_bootstrap([], [])
    with pytest.raises(StatsError, match="NaN"):
        paired_bootstrap([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(StatsError, match="n_boot"):
        paired_bootstrap([1.0], [2.0], n_boot=0)


# --------------------------------------------------------------------------- paired comparison


def test_paired_comparison_binary_counts_flips_and_uses_mcnemar():
    base = [True, True, False, False, False, False, True, False, False, False]
    cond = [True, False, True, True, True, False, True, True, False, True]
    pc = paired_comparison(base, cond, n_boot=2000, seed=0)
    assert pc.test == "mcnemar-exact" and pc.metric == "asr" and pc.n == 10
    assert (pc.flipped_to_success, pc.flipped_to_refusal) == (5, 1)  # hand count
    assert pc.baseline_mean == pytest.approx(0.3) and pc.condition_mean == pytest.approx(0.7)
    assert pc.diff == pytest.approx(0.4)
    assert pc.p_value == pytest.approx(binomtest(1, 6, 0.5).pvalue) == pytest.approx(14 / 64)
    assert pc.ci[0] <= pc.diff <= pc.ci[1]
    assert not pc.significant()
    back = PairedComparison.from_dict(pc.to_dict())
    assert back == pc
    text = describe("sahara-top3", pc, what="ASR")
    assert text.startswith("sahara-top3: ASR +0.40 (95% CI [")
    assert "McNemar p=0.22, n=10" in text and text.endswith("not significant")


def test_paired_comparison_continuous_uses_wilcoxon():
    rng = np.random.default_rng(1)
    x = rng.normal(size=40)
    y = x - 1.0 + 0.3 * rng.normal(size=40)
    pc = paired_comparison(x, y, metric="refusal_log_odds", seed=2)
    assert pc.test == "wilcoxon-signed-rank" and pc.flipped_to_success is None
    assert pc.p_value == pytest.approx(wilcoxon(y - x).pvalue)
    assert pc.significant() and pc.ci[1] < 0
    assert "Wilcoxon p=" in describe("x", pc) and describe("x", pc).endswith("significant at α=0.05")
    same = paired_comparison(x, x, binary=False)
    assert same.p_value == 1.0 and same.diff == 0.0
    with pytest.raises(StatsError, match="binary"):
        paired_comparison(x, y, binary=True)


def test_holm_hand_case():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


# --------------------------------------------------------------------------- random-head nulls


def test_layer_matched_draws_keep_the_layer_counts_and_avoid_the_chosen():
    chosen = [(1, 2), (1, 4), (3, 0)]
    draws = layer_matched_random_heads(GEOM, chosen, n_draws=20, seed=4, exclude=[(3, 1)])
    assert len(draws) == 20
    for d in draws:
        assert sorted(layer for layer, _ in d) == [1, 1, 3]
        assert not set(d) & (set(chosen) | {(3, 1)})
        assert len(set(d)) == 3 and d == sorted(d)
    assert len({tuple(d) for d in draws}) > 5  # they vary
    # a draw depends on its own seed only, not on how many draws are made
    assert layer_matched_random_heads(GEOM, chosen, 3, seed=4, exclude=[(3, 1)]) == draws[:3]
    assert layer_matched_heads(GEOM, chosen, seed=4 * 1000 + 1, exclude=[(3, 1)]) == draws[1]


def test_layer_matched_errors():
    with pytest.raises(StatsError, match="fewer"):
        layer_matched_heads(GEOM, [(0, h) for h in range(4)], seed=0)  # 2 left in layer 0
    with pytest.raises(StatsError, match="at least one"):
        layer_matched_heads(GEOM, [], seed=0)
    with pytest.raises(StatsError, match="duplicate"):
        layer_matched_heads(GEOM, [(0, 1), (0, 1)], seed=0)
    with pytest.raises(IndexError):
        layer_matched_heads(GEOM, [(9, 1)], seed=0)


def test_uniform_random_heads():
    d = uniform_random_heads(GEOM, 5, exclude=[(0, 0)], seed=3)
    assert len(set(d)) == 5 and (0, 0) not in d and d == uniform_random_heads(GEOM, 5, exclude=[(0, 0)], seed=3)
    with pytest.raises(StatsError):
        uniform_random_heads(GEOM, 24, exclude=[(0, 0)])


def test_rank_among_hand_case():
    r = rank_among(0.4, [0.1, 0.5, 0.4, 0.2])
    assert (r["rank"], r["n"], r["ties"]) == (2, 5, 1)
    assert r["p_empirical"] == pytest.approx(3 / 5)
    assert (r["min"], r["median"], r["max"]) == (0.1, pytest.approx(0.3), 0.5)
    assert r["sd"] == pytest.approx(np.std([0.1, 0.5, 0.4, 0.2], ddof=1))
    low = rank_among(-3.0, [-1.0, 0.5], higher_is_better=False)  # a lower log-odds is the stronger effect
    assert low["rank"] == 1 and low["p_empirical"] == pytest.approx(1 / 3)
    with pytest.raises(StatsError):
        rank_among(1.0, [])


# --------------------------------------------------------------------------- agreement


def test_auroc_and_point_biserial_hand_cases():
    scores, labels = [0.1, 0.4, 0.35, 0.8], [False, False, True, True]
    assert auroc(scores, labels) == pytest.approx(0.75)  # 3 of the 4 positive-negative pairs ordered
    assert auroc([1, 1, 1], [True, False, True]) == pytest.approx(0.5)  # ties count one half
    assert auroc([3, 2, 1], [True, True, False]) == 1.0
    r, p = point_biserial(scores, labels)
    ref = pearsonr([0, 0, 1, 1], scores)
    assert r == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    with pytest.raises(StatsError):
        auroc([1, 2], [True, True])
    with pytest.raises(StatsError):
        point_biserial([1, 1], [True, False])


def test_wilson_interval_moved_here_and_re_exported():
    ev = importlib.import_module("safetyheads.evaluate")

    assert ev.wilson_interval is wilson_interval
    z2 = 1.959963984540054 ** 2
    assert wilson_interval(0, 10) == (0.0, pytest.approx(z2 / (10 + z2)))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
