"""Statistics of an evaluation: intervals, paired tests, random-head nulls.

Every condition of an evaluation answers the *same* prompts as the baseline, so conditions are
compared pairwise, prompt by prompt, not through overlapping unpaired intervals:

* :func:`mcnemar_exact` — the exact (binomial) McNemar test on the discordant pairs of two
  binary outcomes; :func:`paired_bootstrap` — the mean paired difference with a percentile
  bootstrap interval (resampling prompts, seeded); :func:`paired_comparison` — both, plus the
  number of prompts flipped each way, as a :class:`PairedComparison`. For continuous values
  (the refusal log-odds) the test is the Wilcoxon signed-rank test instead of McNemar.
* :func:`holm` — Holm's step-down adjustment of several p-values.
* :func:`layer_matched_random_heads` — random head sets drawn from the *same layers* as a chosen
  set (the layer-matched null); :func:`uniform_random_heads` — the older uniform draw;
  :func:`rank_among` — the chosen set's rank among its controls and the controls' spread.
* :func:`auroc`, :func:`point_biserial` — agreement of a continuous score with binary labels.
* :func:`wilson_interval` — the Wilson score interval of one proportion.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

Head = tuple[int, int]

Z95 = 1.959963984540054
"""The two-sided 95 % normal quantile used by the Wilson interval."""

__all__ = [
    "PairedComparison",
    "StatsError",
    "auroc",
    "describe",
    "holm",
    "layer_matched_heads",
    "layer_matched_random_heads",
    "mcnemar_exact",
    "paired_bootstrap",
    "paired_comparison",
    "point_biserial",
    "rank_among",
    "uniform_random_heads",
    "wilson_interval",
]


class StatsError(ValueError):
    """Bad input to a statistic (empty or unequal samples, counts out of range, too few heads to draw)."""


# --------------------------------------------------------------------------- one proportion


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n`` (default 95 %)."""
    if n <= 0:
        raise StatsError("the Wilson interval needs n >= 1")
    if not 0 <= successes <= n:
        raise StatsError(f"successes must be in 0..{n}, got {successes}")
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


# --------------------------------------------------------------------------- paired tests


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c``.

    Under the null both kinds of discordant pair are equally likely, so ``b ~ Binomial(b + c, 1/2)``;
    the p-value is scipy's exact two-sided binomial test. 1.0 when there are no discordant pairs.
    """
    for name, v in (("b", b), ("c", c)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise StatsError(f"{name} must be a count (int >= 0), got {v!r}")
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(min(1.0, binomtest(int(b), int(b + c), 0.5, alternative="two-sided").pvalue))


def _pair(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(x, str) or isinstance(y, str):
        raise StatsError("paired samples must be sequences of numbers, not strings")
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.ndim != 1 or ya.ndim != 1:
        raise StatsError("paired samples must be 1-D")
    if xa.shape != ya.shape:
        raise StatsError(f"paired samples differ in length: {xa.shape[0]} vs {ya.shape[0]}")
    if xa.size == 0:
        raise StatsError("paired samples are empty")
    if not (np.isfinite(xa).all() and np.isfinite(ya).all()):
        raise StatsError("paired samples hold NaN or infinite values")
    return xa, ya


def paired_bootstrap(x: Sequence[float], y: Sequence[float], n_boot: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """``(diff, low, high)``: the mean of ``y − x`` and its percentile bootstrap interval.

    Prompts (pairs) are resampled with replacement ``n_boot`` times with ``numpy.random.default_rng(seed)``;
    the interval is the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles (numpy's default linear
    interpolation) of the resampled mean differences. For binary outcomes with few discordant pairs
    it is narrower than the exact McNemar test implies (e.g. 4 flips one way, none the other: the
    interval excludes 0, exact p = 0.125); significance is read from the test, not the interval.
    """
    xa, ya = _pair(x, y)
    if not isinstance(n_boot, int) or n_boot < 1:
        raise StatsError(f"n_boot must be a positive int, got {n_boot!r}")
    if not 0 < level < 1:
        raise StatsError(f"level must be in (0, 1), got {level!r}")
    d = ya - xa
    diff = float(d.mean())
    rng = np.random.default_rng(seed)
    n = d.size
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // n)  # bounded memory for long samples
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        means[start:start + m] = d[rng.integers(0, n, size=(m, n))].mean(1)
    alpha = 1 - level
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return diff, float(low), float(high)


def _wilcoxon(d: np.ndarray) -> float:
    if not np.any(d != 0):
        return 1.0
    from scipy.stats import wilcoxon

    return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


@dataclass(frozen=True)
class PairedComparison:
    """A condition against the baseline on the same prompts.

    Attributes:
        metric: what was compared (``"asr"``, ``"refusal_log_odds"``, …).
        n: number of prompts (pairs).
        baseline_mean, condition_mean: the two means; ``diff = condition_mean − baseline_mean``.
        ci: the paired bootstrap interval of ``diff`` at ``level``.
        p_value: two-sided p of ``test`` (``"mcnemar-exact"`` for binary outcomes,
            ``"wilcoxon-signed-rank"`` for continuous ones).
        flipped_to_success: binary only: prompts that fail (0) at baseline and succeed (1) under the
            condition (for ASR: a refusal turned into compliance); None for continuous values.
        flipped_to_refusal: binary only: prompts that succeed at baseline and fail under the condition.
        n_boot, seed, level: the bootstrap's settings.
    """

    metric: str
    n: int
    baseline_mean: float
    condition_mean: float
    diff: float
    ci: tuple[float, float]
    p_value: float
    test: str
    flipped_to_success: int | None
    flipped_to_refusal: int | None
    n_boot: int
    seed: int
    level: float = 0.95

    def significant(self, alpha: float = 0.05) -> bool:
        """Whether ``p_value < alpha``."""
        return self.p_value < alpha

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"] = [float(self.ci[0]), float(self.ci[1])]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairedComparison:
        """Inverse of :meth:`to_dict`; extra keys (such as an added ``p_holm``) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and k != "ci"}, ci=tuple(d["ci"]))


def _is_binary(a: np.ndarray) -> bool:
    return bool(np.all((a == 0) | (a == 1)))


def paired_comparison(baseline: Sequence[bool | float], condition: Sequence[bool | float], *, metric: str = "asr",
                      binary: bool | None = None, n_boot: int = 10_000, seed: int = 0,
                      level: float = 0.95) -> PairedComparison:
    """Compare ``condition`` with ``baseline`` prompt by prompt.

    Args:
        baseline, condition: one value per prompt, in the same prompt order. For ASR pass the
            attack-success flags (True = the response is *not* a refusal).
        metric: a label stored in the result.
        binary: treat the values as 0/1 outcomes (McNemar) or continuous (Wilcoxon signed-rank).
            Default: binary when every value is 0 or 1 (bools included).
        n_boot, seed, level: the paired bootstrap (:func:`paired_bootstrap`).

    Raises:
        StatsError: empty or unequal samples, non-finite values, or ``binary=True`` with values
            other than 0/1.
    """
    xa, ya = _pair(baseline, condition)
    is_bin = _is_binary(xa) and _is_binary(ya)
    if binary is None:
        binary = is_bin
    elif binary and not is_bin:
        raise StatsError("binary=True but the values are not all 0 or 1")
    diff, low, high = paired_bootstrap(xa, ya, n_boot=n_boot, seed=seed, level=level)
    if binary:
        to_success = int(np.sum((xa == 0) & (ya == 1)))
        to_refusal = int(np.sum((xa == 1) & (ya == 0)))
        p, test = mcnemar_exact(to_refusal, to_success), "mcnemar-exact"
    else:
        to_success = to_refusal = None
        p, test = _wilcoxon(ya - xa), "wilcoxon-signed-rank"
    return PairedComparison(metric=metric, n=int(xa.size), baseline_mean=float(xa.mean()),
                            condition_mean=float(ya.mean()), diff=diff, ci=(low, high), p_value=p, test=test,
                            flipped_to_success=to_success, flipped_to_refusal=to_refusal, n_boot=n_boot, seed=seed,
                            level=level)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given; monotone, capped at 1)."""
    p = [float(v) for v in p_values]
    if any(not 0 <= v <= 1 for v in p):
        raise StatsError(f"p-values must be in [0, 1], got {p}")
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


_TEST_NAMES = {"mcnemar-exact": "McNemar", "wilcoxon-signed-rank": "Wilcoxon"}


def describe(name: str, pc: PairedComparison | dict[str, Any], *, what: str = "", alpha: float = 0.05,
             digits: int = 2) -> str:
    """One sentence: ``"sahara-top3: +0.09 (95% CI [-0.03, 0.22]), McNemar p=0.21, n=32 — not significant"``.

    ``what`` (e.g. ``"ASR"``) is put before the difference; significance is ``p < alpha`` (unadjusted).
    """
    if isinstance(pc, dict):
        pc = PairedComparison.from_dict(pc)
    test = _TEST_NAMES.get(pc.test, pc.test)
    lo, hi = pc.ci
    verdict = f"significant at α={alpha:g}" if pc.significant(alpha) else "not significant"
    label = f"{what} " if what else ""
    flips = (f", flipped {pc.flipped_to_success}↑/{pc.flipped_to_refusal}↓"
             if pc.flipped_to_success is not None else "")
    return (f"{name}: {label}{pc.diff:+.{digits}f} ({round(100 * pc.level):d}% CI [{lo:+.{digits}f}, {hi:+.{digits}f}]), "
            f"{test} p={_fmt_p(pc.p_value)}, n={pc.n}{flips} — {verdict}")


def _fmt_p(p: float) -> str:
    if p < 1e-4:
        return f"{p:.1e}"
    return f"{p:.2g}" if p < 0.1 else f"{p:.2f}"


# --------------------------------------------------------------------------- random-head nulls


def _geometry(geometry_or_model: Any):
    from .adapters import HeadGeometry, head_geometry

    if isinstance(geometry_or_model, HeadGeometry):
        return geometry_or_model
    return head_geometry(geometry_or_model)


def layer_matched_heads(geometry_or_model: Any, heads: Sequence[Head], *, seed: int,
                        exclude: Sequence[Head] = ()) -> list[Head]:
    """One layer-matched draw: for each layer, as many heads of that layer as ``heads`` has there,
    drawn uniformly without replacement from that layer's heads minus ``heads`` and ``exclude``.

    Deterministic for a given ``seed`` (``random.Random(seed)``, layers in increasing order). Sorted.

    Raises:
        StatsError: ``heads`` is empty or repeats a head, or a layer has too few heads left.
    """
    from .adapters import validate_heads

    g = _geometry(geometry_or_model)
    chosen = validate_heads(heads, g)
    if not chosen:
        raise StatsError("layer-matched draws need at least one chosen head")
    if len(set(chosen)) != len(chosen):
        raise StatsError(f"duplicate heads in {chosen}")
    banned = set(chosen) | set(validate_heads(exclude, g))
    rng = random.Random(seed)
    out: list[Head] = []
    for layer, count in sorted(Counter(layer for layer, _ in chosen).items()):
        pool = [(layer, h) for h in range(g.n_heads) if (layer, h) not in banned]
        if count > len(pool):
            raise StatsError(f"layer {layer} has {g.n_heads} heads; after excluding {g.n_heads - len(pool)} "
                             f"there are {len(pool)} left, fewer than the {count} to draw")
        out += rng.sample(pool, count)
    return sorted(out)


def layer_matched_random_heads(geometry_or_model: Any, heads: Sequence[Head], n_draws: int, seed: int = 0, *,
                               exclude: Sequence[Head] = ()) -> list[list[Head]]:
    """``n_draws`` layer-matched random head sets for ``heads`` (see :func:`layer_matched_heads`).

    Draw ``i`` uses seed ``seed * 1000 + i`` (:func:`random_control_seed`), so a draw does not
    depend on ``n_draws``.
    """
    if not isinstance(n_draws, int) or n_draws < 0:
        raise StatsError(f"n_draws must be an int >= 0, got {n_draws!r}")
    return [layer_matched_heads(geometry_or_model, heads, seed=random_control_seed(seed, i), exclude=exclude)
            for i in range(n_draws)]


def uniform_random_heads(geometry_or_model: Any, k: int, *, exclude: Sequence[Head] = (), seed: int = 0) -> list[Head]:
    """``k`` heads drawn uniformly without replacement from all heads except ``exclude`` (sorted).

    Deterministic for a given ``seed`` (``random.Random(seed)``).
    """
    from .adapters import validate_heads

    g = _geometry(geometry_or_model)
    banned = set(validate_heads(exclude, g))
    pool = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads) if (layer, h) not in banned]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise StatsError(f"k must be a positive int, got {k!r}")
    if k > len(pool):
        raise StatsError(f"cannot draw {k} random heads: only {len(pool)} heads are left after excluding {len(banned)}")
    return sorted(random.Random(seed).sample(pool, k))


def random_control_seed(seed: int, i: int) -> int:
    """The seed of random control draw ``i`` (``seed * 1000 + i``)."""
    return seed * 1000 + i


def rank_among(value: float, control_values: Sequence[float], *, higher_is_better: bool = True) -> dict[str, Any]:
    """Where ``value`` (the chosen set's effect) falls among its random controls' values.

    Returns ``{"value", "rank", "n", "n_controls", "ties", "p_empirical", "min", "median", "max",
    "mean", "sd", "higher_is_better"}``: ``rank`` is 1 + the number of controls strictly better
    (1 = best), ``ties`` the controls exactly equal, and ``p_empirical = (1 + #controls at least as
    good) / (1 + n_controls)`` — the one-sided permutation p of the chosen set under the null that
    it is one more random draw (its smallest possible value is ``1 / (1 + n_controls)``).
    ``sd`` is the controls' sample standard deviation (None with fewer than 2).
    """
    v = float(value)
    c = [float(x) for x in control_values]
    if not c:
        raise StatsError("rank_among needs at least one control value")
    if not all(math.isfinite(x) for x in c + [v]):
        raise StatsError("rank_among: values must be finite")
    sign = 1.0 if higher_is_better else -1.0
    better = sum(1 for x in c if sign * x > sign * v)
    ties = sum(1 for x in c if x == v)
    return {"value": v, "rank": 1 + better, "n": len(c) + 1, "n_controls": len(c), "ties": ties,
            "p_empirical": (1 + better + ties) / (1 + len(c)), "min": min(c), "median": statistics.median(c),
            "max": max(c), "mean": statistics.fmean(c), "sd": statistics.stdev(c) if len(c) > 1 else None,
            "higher_is_better": higher_is_better}


# --------------------------------------------------------------------------- score vs label agreement


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for the positive ``labels`` (ties count one half).

    The probability that a random positive scores higher than a random negative (the Mann–Whitney
    U statistic over ``n_pos · n_neg``). Raises :class:`StatsError` without both classes.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise StatsError(f"scores and labels must be 1-D of equal length, got {s.shape} and {y.shape}")
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        raise StatsError("AUROC needs both positive and negative labels")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))  # average ranks for ties
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))


def point_biserial(scores: Sequence[float], labels: Sequence[bool]) -> tuple[float, float]:
    """``(r, p)``: the point-biserial correlation of ``scores`` with binary ``labels`` (scipy)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise StatsError(f"scores and labels must be 1-D of equal length, got {s.shape} and {y.shape}")
    if y.all() or not y.any():
        raise StatsError("the point-biserial correlation needs both labels")
    if np.all(s == s[0]):
        raise StatsError("the point-biserial correlation needs scores that vary")
    from scipy.stats import pointbiserialr

    r = pointbiserialr(y.astype(np.float64), s)
    return float(r.statistic), float(r.pvalue)
