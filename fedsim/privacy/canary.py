"""One-shot empirical ε from canary clients (Andrew et al., ICLR 2024, "One-shot Empirical
Privacy Estimation for Federated Learning").

Canary clients (:mod:`fedsim.server.canaries`) each send, when sampled, an update along their
own random unit direction c_i; half of them are never inserted (their bit is out). In d
dimensions a direction independent of the model has cosine ≈ N(0, 1/d) with any fixed vector,
so the cosines of inserted canaries stand out by how much each one moved the released model:

- **final model**: t_i = cos(θ_T − θ_0, c_i), the threat model of a user who sees the final
  model only; the null is N(0, 1/d) (exactly: (1 + t)/2 ~ Beta((d−1)/2, (d−1)/2), mean 0 and
  variance 1/d);
- **all iterates**: t_i = max over rounds of cos(Δ_t, c_i), Δ_t the released update of round
  t — the server's view, and the one DP-FedAvg's accountant bounds; its null is estimated
  from the canaries that were never inserted.

Fitting a Gaussian N(μ, s²) to the inserted canaries' statistics, the ε estimate is the ε at δ
of telling N(μ, s²) from the null Gaussian apart (:func:`epsilon_of_gaussians`; the privacy
loss of two Gaussians with unequal variances, computed exactly). For a Gaussian mechanism the
estimate is its ε; in general it is **an estimate, not a bound** (it can exceed the true ε by
sampling error): :mod:`fedsim.privacy.one_run` turns the same canaries into a lower bound that
holds at a stated confidence.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.special import logsumexp
from scipy.stats import norm

WHAT = ("an estimate of ε (Andrew et al. 2024: Gaussians fitted to the canaries' statistics), "
        "not a bound: it can exceed the true ε by sampling error")


def cosines(vector: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """cos(vector, row) for each row of ``directions`` (unit rows); 0 for a zero vector."""
    v = np.asarray(vector, dtype=np.float64).ravel()
    size = np.linalg.norm(v)
    if size == 0:
        return np.zeros(len(directions))
    return (np.asarray(directions, dtype=np.float64) @ v) / size


def _log_prob(mu: float, sd: float, lo: float, hi: float) -> float:
    """log P[lo < Y < hi] for Y ~ N(mu, sd²), accurate in both tails."""
    if hi <= lo:
        return -math.inf
    if lo == -math.inf:
        return float(norm.logcdf(hi, mu, sd))
    if hi == math.inf:
        return float(norm.logsf(lo, mu, sd))
    if lo > mu:  # both in the upper tail: sf(lo) - sf(hi)
        a, b = norm.logsf(lo, mu, sd), norm.logsf(hi, mu, sd)
    else:
        a, b = norm.logcdf(hi, mu, sd), norm.logcdf(lo, mu, sd)
    return float(logsumexp([a, b], b=[1, -1])) if a > b else -math.inf


def _log_delta(p: tuple[float, float], q: tuple[float, float], eps: float) -> float:
    """log δ_{P‖Q}(ε) = log(P[L > ε] − e^ε·Q[L > ε]), L = log p/q, for Gaussians P and Q."""
    (m1, s1), (m0, s0) = p, q
    a = 1 / (2 * s0**2) - 1 / (2 * s1**2)  # L(y) = a y² + b y + c
    b = m1 / s1**2 - m0 / s0**2
    c = m0**2 / (2 * s0**2) - m1**2 / (2 * s1**2) + math.log(s0 / s1)
    if abs(a) < 1e-12 * (abs(b) + 1e-300) or a == 0:
        if b == 0:
            return -math.inf if c <= eps else 0.0
        t = (eps - c) / b
        region = [(t, math.inf)] if b > 0 else [(-math.inf, t)]
    else:
        disc = b * b - 4 * a * (c - eps)
        if disc <= 0:  # L never crosses ε: everywhere above (δ ≤ 0) or nowhere
            return -math.inf
        r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
        region = [(-math.inf, r1), (r2, math.inf)] if a > 0 else [(r1, r2)]
    log_p = logsumexp([_log_prob(m1, s1, lo, hi) for lo, hi in region])
    log_q = logsumexp([_log_prob(m0, s0, lo, hi) for lo, hi in region])
    gap = eps + log_q - log_p
    if not log_p > -math.inf or gap >= 0:
        return -math.inf
    return float(log_p + math.log1p(-math.exp(gap)))


def epsilon_of_gaussians(mu0: float, sd0: float, mu1: float, sd1: float,
                         delta: float) -> float:
    """The smallest ε such that N(mu0, sd0²) and N(mu1, sd1²) are (ε, δ)-indistinguishable
    in both directions (inf when no finite ε is; 0 when ε = 0 already is)."""
    if not (sd0 > 0 and sd1 > 0) or not 0 < delta < 1:
        raise ValueError(f"need positive standard deviations and delta in (0, 1); got {sd0}, "
                         f"{sd1}, {delta}")
    pairs = (((mu1, sd1), (mu0, sd0)), ((mu0, sd0), (mu1, sd1)))

    def excess(eps: float) -> float:
        return max(_log_delta(p, q, eps) for p, q in pairs) - math.log(delta)

    if excess(0.0) <= 0:
        return 0.0
    high = 1.0
    while excess(high) > 0:
        high *= 2
        if high > 1e6:
            return math.inf
    return float(brentq(excess, high / 2 if high > 1 else 0.0, high, xtol=1e-9, rtol=1e-10))


def gaussian_estimate(observed: np.ndarray, null_mean: float, null_sd: float,
                      delta: float) -> dict:
    """Andrew et al.'s estimate: ε of N(mean, sd²) of the ``observed`` (inserted) canaries'
    statistics against the null N(null_mean, null_sd²)."""
    obs = np.asarray(observed, dtype=np.float64).ravel()
    if obs.size < 2:
        return {"epsilon_estimate": None, "why_null": f"{obs.size} inserted canaries: a "
                "Gaussian needs at least 2", "what": WHAT}
    mu, sd = float(obs.mean()), float(obs.std(ddof=1))
    if sd == 0:
        return {"epsilon_estimate": None, "observed_mean": mu, "observed_std": sd,
                "why_null": "the inserted canaries' statistics do not vary", "what": WHAT}
    eps = epsilon_of_gaussians(null_mean, null_sd, mu, sd, delta)
    return {"epsilon_estimate": None if math.isinf(eps) else eps, "observed_mean": mu,
            "observed_std": sd, "null_mean": null_mean, "null_std": null_sd, "delta": delta,
            "what": WHAT}
