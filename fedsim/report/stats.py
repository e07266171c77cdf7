"""The statistics behind a sweep's claims: paired t intervals, Holm's correction, power.

Pure functions of numbers (scipy for the t and normal quantiles); no fedsim types.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

#: a spread at most this fraction of the values' size is float rounding, not spread (equal
#: differences computed in floats can differ in their last bits)
SPREAD_RESIDUE = 1e-9
#: above this many paired seeds, :func:`seeds_needed` says None: no practical study detects it
MAX_SEEDS = 10**6


@dataclass(frozen=True)
class PairedT:
    """A paired t-test of mean(a − b) = 0 with its two-sided interval at ``level``.

    ``p_value``, ``ci_low`` and ``ci_high`` are None for fewer than two pairs (no spread).
    """

    n: int
    mean: float | None
    sd: float | None
    level: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None


@dataclass(frozen=True)
class TTests:
    """Paired t-tests of mean = 0 over the last axis of an array of differences, one per
    leading index (vectorized: a null simulation runs thousands at once).

    ``p_value``, ``ci_low`` and ``ci_high`` are NaN where the test is undefined: fewer than
    two values, or no spread (every value the same, up to ``SPREAD_RESIDUE``).
    """

    n: int
    mean: np.ndarray
    sd: np.ndarray
    level: float
    ci_low: np.ndarray
    ci_high: np.ndarray
    p_value: np.ndarray


def t_tests(diffs: np.ndarray | Sequence[float], level: float = 0.95) -> TTests:
    """Student's one-sample t of mean = 0 over the last axis of ``diffs`` (two-sided), with
    its interval mean ± t_{(1+level)/2, n−1} · s/√n; ``scipy.stats.ttest_1samp(d, 0,
    axis=-1)`` where defined."""
    d = np.asarray(diffs, dtype=float)
    n = d.shape[-1]
    mean = d.mean(axis=-1) if n else np.full(d.shape[:-1], np.nan)
    if n < 2:
        nan = np.full(d.shape[:-1], np.nan)
        return TTests(n, mean, nan, level, nan, nan, nan)
    sd = d.std(axis=-1, ddof=1)
    spread = sd > SPREAD_RESIDUE * np.abs(d).max(axis=-1)
    se = np.where(spread, sd, np.nan) / math.sqrt(n)
    half = float(sps.t.ppf((1 + level) / 2, n - 1)) * se
    p = 2 * sps.t.sf(np.abs(mean) / se, n - 1)
    return TTests(n, mean, sd, level, mean - half, mean + half, p)


def seed_means(diffs: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """One difference per seed: ``diffs[..., seed, setting]`` averaged over its settings.

    Cells of a sweep that share a seed share data, partition and initial model, so the
    differences of one seed's settings are not independent pairs; their mean is one value
    per independent replicate. A paired t over these means has n = seeds and keeps its
    nominal level whatever the settings share (pooling seeds × settings as independent pairs
    does not: RESEARCH.md, "Claim statistics").
    """
    return np.asarray(diffs, dtype=float).mean(axis=-1)


def paired_t(diffs: Sequence[float], level: float = 0.95) -> PairedT:
    """Student's one-sample t on the paired differences ``diffs`` (= ``ttest_rel(a, b)``).

    Interval: mean ± t_{(1+level)/2, n−1} · s/√n. When every difference is the same (up to
    float rounding), s = 0: p = 1 and the interval [0, 0] if they are all zero, else p = 0
    and the interval [d, d] (:func:`fedsim.report.claims.untestable` refuses to decide on
    either).
    """
    d = np.asarray(diffs, dtype=float)
    n = int(d.size)
    if n == 0:
        return PairedT(0, None, None, level, None, None, None)
    mean = float(d.mean())
    if n < 2:
        return PairedT(1, mean, None, level, None, None, None)
    t = t_tests(d, level)
    if np.isnan(t.p_value):  # no spread: the difference is exact
        mean = float(d[0])
        return PairedT(n, mean, 0.0, level, mean, mean, 1.0 if mean == 0.0 else 0.0)
    return PairedT(n, float(t.mean), float(t.sd), level, float(t.ci_low), float(t.ci_high),
                   float(t.p_value))


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """The ``level`` t-interval of the mean of ``values`` (None for fewer than two)."""
    r = paired_t(values, level)
    return None if r.ci_low is None else (r.ci_low, r.ci_high)


def holm(p_values: Sequence[float | None], alpha: float = 0.05
         ) -> tuple[list[float | None], list[float]]:
    """Holm–Bonferroni over ``m = len(p_values)`` tests (Holm 1979).

    Returns each test's adjusted p (the running max of (m − j)·p_(j) over the sorted p-values,
    capped at 1; a test is rejected at level α iff its adjusted p ≤ α) and the interval level
    of its rank k, 1 − α/(m − k), at which its t interval excludes zero iff p < α/(m − k).
    Tests without a p-value (None) count in m, rank last and stay None.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: (p_values[i] is None, p_values[i] or 0.0, i))
    adjusted: list[float | None] = [None] * m
    levels = [0.0] * m
    running = 0.0
    for k, i in enumerate(order):
        levels[i] = 1 - alpha / (m - k)
        if p_values[i] is not None:
            running = max(running, min(1.0, (m - k) * p_values[i]))
            adjusted[i] = running
    return adjusted, levels


def seeds_needed(mean: float | None, sd: float | None, power: float = 0.8,
                 alpha: float = 0.05) -> int | None:
    """Paired seeds to detect a true difference ``mean`` with spread ``sd`` by a two-sided
    paired t-test at level ``alpha`` with probability ``power``.

    The textbook normal approximation is n ≈ ((z_{1−α/2} + z_{power}) · sd / |mean|)²; with a
    few seeds the t quantiles are much wider, so this returns the smallest n ≥ 2 with
    n ≥ ((t_{1−α/2, n−1} + t_{power, n−1}) · sd / |mean|)² (it tends to the normal one for
    large n). None without an effect or a spread to size it by, or when more than
    ``MAX_SEEDS`` would be needed (no practical study would detect it).
    """
    if mean is None or sd is None or not math.isfinite(sd):
        return None
    if abs(mean) <= 1e-12 * max(1.0, sd):  # no effect (a difference of rounding residue)
        return None
    ratio = sd / abs(mean)
    z = float(sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power))
    n = max(2, math.ceil((z * ratio) ** 2))
    if n > MAX_SEEDS:  # no practical number of seeds would detect it
        return None
    while n < MAX_SEEDS:
        t = float(sps.t.ppf(1 - alpha / 2, n - 1) + sps.t.ppf(power, n - 1))
        if n >= (t * ratio) ** 2:
            return n
        n += 1
    return n
