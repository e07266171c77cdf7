"""Steinke, Nasr & Jagielski's one-run lower bound: the p-value by hand and by brute force, and
on a Gaussian mechanism simulated in numpy it stays below the known ε at the stated
confidence, and is large without noise."""

import math

import dp_accounting
import numpy as np
import pytest
from scipy.stats import binom

from fedsim.privacy.one_run import epsilon_lower_bound, one_run_audit, p_value


def test_p_value_without_delta_is_the_binomial_tail():
    q = math.e / (1 + math.e)  # ε = 1
    assert p_value(100, 20, 15, 1.0, 0.0) == pytest.approx(binom.sf(14, 20, q), rel=1e-12)
    assert p_value(100, 20, 0, 1.0, 0.0) == 1.0


def test_p_value_with_delta_matches_the_algorithm_by_brute_force():
    m, r, v, eps, delta = 50, 30, 25, 0.7, 1e-3
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [binom.pmf(j, r, q) for j in range(r + 1)]
    beta = sum(pmf[v:])
    alpha = max(sum(pmf[v - i:v]) / i for i in range(1, v + 1))  # P[v > Bin >= v - i] / i
    assert p_value(m, r, v, eps, delta) == pytest.approx(min(1, beta + alpha * delta * 2 * m),
                                                         rel=1e-9)


def test_the_lower_bound_is_where_the_p_value_crosses_the_significance():
    eps = epsilon_lower_bound(1000, 200, 180, 1e-5, 0.05)
    assert p_value(1000, 200, 180, eps, 1e-5) == pytest.approx(0.05, rel=1e-4)
    assert p_value(1000, 200, 180, eps * 0.99, 1e-5) < 0.05
    assert epsilon_lower_bound(1000, 200, 100, 1e-5, 0.05) == 0.0  # chance: no evidence


def gaussian_run(seed: int, canaries: int, sigma: float):
    """One run of the Gaussian mechanism on the canaries' bits: y = bits + N(0, σ²) per
    canary. Each bit moves y by 1 in L2, so the mechanism is (ε_σ, δ)-DP in every canary."""
    rng = np.random.default_rng(seed)
    bits = rng.random(canaries) < 0.5
    return bits + rng.normal(0.0, sigma, canaries), bits


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_a_gaussian_mechanism_stays_below_its_epsilon_at_95_percent(sigma):
    true = dp_accounting.get_epsilon_gaussian(sigma, 1e-5)
    found = [one_run_audit(*gaussian_run(s, 1000, sigma), delta=1e-5)["epsilon_lower_bound"]
             for s in range(40)]
    assert sum(f > true for f in found) <= 2  # at most 5% of draws (none, in practice)
    assert np.median(found) > 0  # and the audit does find something


def test_without_noise_the_bound_is_large():
    """2,000 canaries, every guess right: ε ≈ 5.1 at 95% (Bonferroni over the 8 guesses of
    the grid), about the most one run of this many canaries can show (1,000 right guesses a
    side would give 5.9, but 1,007 canaries are in, so the widest guesses make 7 mistakes)."""
    out = one_run_audit(*gaussian_run(0, 2000, 1e-9), delta=1e-5)
    assert out["epsilon_lower_bound"] > 5
    assert out["correct"] == out["guesses"] == 1000
    assert (out["guessed_in"], out["guessed_out"]) == (500, 500)


def test_one_sided_guesses_survive_in_canaries_that_never_took_part():
    """A fifth of the in canaries score like out ones (never sampled): guessing "out" on the
    lowest scores errs, guessing "in" on the highest does not."""
    bits = np.arange(1000) % 2 == 0
    scores = np.where(bits & (np.arange(1000) % 10 != 0), 1.0, 0.0) + np.arange(1000) * 1e-6
    out = one_run_audit(scores, bits, 1e-5)
    assert out["guessed_out"] == 0 and out["correct"] == out["guesses"] == out["guessed_in"]
    two_sided = [g for g in out["grid"] if g[1]]
    assert len(out["grid"]) == 2 * len(two_sided)


def test_ties_break_by_canary_index_and_bad_input_is_refused():
    bits = np.array([True, False] * 5)
    assert one_run_audit(np.zeros(10), bits, 1e-5)["epsilon_lower_bound"] == 0.0
    with pytest.raises(ValueError, match="one score per canary"):
        one_run_audit(np.zeros(3), bits, 1e-5)
    with pytest.raises(ValueError, match="NaN"):
        one_run_audit(np.r_[np.nan, np.zeros(9)], bits, 1e-5)
