"""An ε lower bound from one training run (Steinke, Nasr & Jagielski, NeurIPS 2023, "Privacy
Auditing with One (1) Training Run").

m canaries are each included independently with probability 1/2. After training the auditor
scores every canary from what it observes, guesses "in" for the k₊ highest scores and "out"
for the k₋ lowest, and abstains on the rest. If the mechanism is (ε, δ)-DP with respect to
each canary's inclusion, the number of correct guesses among the r = k₊ + k₋ made is
stochastically dominated — up to a δ term — by Binomial(r, e^ε / (1 + e^ε)) (their Theorem
3.1). So an observed count v gives a p-value for "the mechanism is (ε, δ)-DP"
(:func:`p_value`, their Algorithm 2), and the largest ε whose p-value is below 1 − confidence
is a lower bound on ε valid for this single run at that confidence
(:func:`epsilon_lower_bound`).

The guesses are tried on a fixed grid, the same whatever the scores: k from
:data:`GUESS_FRACTIONS` of m/2, both two-sided (k₊ = k₋ = k) and one-sided (k₊ = k, k₋ = 0:
an in canary that was never sampled looks out, so guessing "out" costs more than guessing
"in"); each test at significance (1 − confidence)/|grid| (Bonferroni), so the best of them
still holds at the stated confidence. Ties in the scores are broken by canary index, which is
fixed before the run and independent of the bits.

Pure functions: the canaries' scores come from :mod:`fedsim.privacy.canary`, the bits from
:mod:`fedsim.canaries`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import binom

#: the guesses tried, as fractions of m/2 (each two-sided and one-sided; Bonferroni over the
#: grid: few sizes, since every one tried costs the others some confidence)
GUESS_FRACTIONS = (0.1, 0.25, 0.5, 1.0)
WHAT = ("a lower bound on ε valid for this one run at the stated confidence (Steinke, Nasr & "
        "Jagielski 2023): a larger ε than the accountant's would contradict the guarantee")


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability of at least ``correct`` right guesses out of ``guesses`` if the mechanism
    is (ε, δ)-DP in each of the ``canaries`` inclusions (Steinke et al. 2023, Algorithm 2):
    β + α·δ·2m with β = P[Bin(r, q) ≥ v], q = e^ε/(1 + e^ε), and α the largest
    P[v > Bin(r, q) ≥ v − i] / i over i = 1..v."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {correct}, "
                         f"{guesses}, {canaries}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = float(expit(epsilon))
    beta = float(binom.sf(correct - 1, guesses, q))
    if delta == 0 or correct == 0:
        return min(beta, 1.0)
    i = np.arange(1, correct + 1)
    between = binom.sf(correct - i - 1, guesses, q) - beta  # P[v > Bin >= v - i]
    alpha = float(np.max(between / i))
    return min(beta + alpha * delta * 2 * canaries, 1.0)


def epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float,
                        significance: float) -> float:
    """The largest ε for which :func:`p_value` is below ``significance`` (0 if none is): the
    (ε, δ) claims it rejects, and so a lower bound on the ε of the run."""
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")

    def gap(eps: float) -> float:
        return significance - p_value(canaries, guesses, correct, eps, delta)

    if gap(0.0) <= 0:
        return 0.0
    high = 1.0
    while gap(high) > 0:
        high *= 2
        if high > 1e4:  # every guess right and δ negligible: no ε is large enough
            return math.inf
    return float(brentq(gap, high / 2 if high > 1 else 0.0, high, xtol=1e-6))


def one_run_audit(scores: np.ndarray, included: np.ndarray, delta: float,
                  confidence: float = 0.95) -> dict:
    """The best ε lower bound over the guess grid (module docstring).

    Parameters
    ----------
    scores
        One score per canary, higher = more likely in.
    included
        Each canary's bit (in or out), drawn before the run with probability 1/2.
    delta
        The δ of the guarantee being tested.
    confidence
        The bound holds with this probability over the canaries' bits and the run.

    Returns
    -------
    dict with ``epsilon_lower_bound``, ``confidence``, ``delta``, ``canaries``, ``included``,
    and the best guess: ``guesses`` (r), ``correct`` (v), ``guessed_in`` (k₊), ``guessed_out``
    (k₋); ``grid`` (the (k₊, k₋) tried), ``significance_each``, ``what``.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    bits = np.asarray(included, dtype=bool).ravel()
    if s.shape != bits.shape or s.size < 2:
        raise ValueError(f"need one score per canary and at least 2 canaries, got {s.size} "
                         f"scores and {bits.size} bits")
    if not np.isfinite(s).all():
        raise ValueError("canary scores contain NaN or infinity")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    m = s.size
    order = np.lexsort((np.arange(m), -s))  # highest score first, ties by canary index
    sizes = sorted({max(1, round(f * m / 2)) for f in GUESS_FRACTIONS})
    grid = [(k, out) for k in sizes if k <= m // 2 for out in (k, 0)]
    significance = (1 - confidence) / len(grid)
    best = {"epsilon_lower_bound": 0.0, "guesses": 0, "correct": 0, "guessed_in": 0,
            "guessed_out": 0}
    for k_in, k_out in grid:
        correct = int(bits[order[:k_in]].sum() + (~bits[order[m - k_out:]]).sum()
                      if k_out else bits[order[:k_in]].sum())
        eps = epsilon_lower_bound(m, k_in + k_out, correct, delta, significance)
        if eps > best["epsilon_lower_bound"] or not best["guesses"]:
            best = {"epsilon_lower_bound": eps, "guesses": k_in + k_out, "correct": correct,
                    "guessed_in": k_in, "guessed_out": k_out}
    return {**best, "confidence": confidence, "delta": delta, "canaries": m,
            "included": int(bits.sum()), "grid": [list(g) for g in grid],
            "significance_each": significance, "what": WHAT}
