"""Audited ε: a statistical lower bound on the privacy loss from a membership attack's ROC.

An (ε, δ)-DP mechanism limits every membership test: at any threshold,
TPR ≤ e^ε·FPR + δ, and, for the complementary decision, TNR ≤ e^ε·FNR + δ
(Kairouz et al. 2015). So an observed attack implies ε ≥ log((TPR − δ)/FPR) and
ε ≥ log((1 − FPR − δ)/(1 − TPR)). Following Jagielski et al. (NeurIPS 2020, "Auditing
Differentially Private Machine Learning") and Nasr et al. (IEEE S&P 2021, "Adversary
Instantiation"), the rates are replaced by one-sided Clopper–Pearson bounds at confidence
``c`` — a lower bound on TPR from #true positives of #members, an upper bound on FPR from
#false positives of #non-members — so each ε_lb(t) holds with that confidence. We take both
directions at every distinct score threshold t (ties handled as in
:mod:`fedsim.privacy.metrics`) and report the maximum.

The threshold is chosen on the same data the bounds come from, so each of the T thresholds'
bounds is taken at confidence 1 − (1 − c)/T (Bonferroni): then all T hold together with
confidence c, and so does their maximum (``confidence_each`` in the result). Without that
correction a chance attack on 500 + 500 examples (~1000 thresholds, c = 0.95) gave ε_lb > 0
in 3 of 20 draws. What it is still not: a proof for the training run — the examples of one
run are treated as independent trials, while Jagielski et al. train one model per trial
(Steinke, Nasr and Jagielski, NeurIPS 2023, give a bound valid for one run). Read it as
evidence: an ε_lb above the accountant's ε means a broken guarantee (or an accountant that
does not apply), an ε_lb far below it means the attack is weak or the analysis loose — not
which.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta

from fedsim.privacy.metrics import _check


def cp_lower(k: np.ndarray | int, n: int, confidence: float) -> np.ndarray:
    """One-sided Clopper–Pearson lower bound on a rate from ``k`` successes of ``n``
    (0 when ``k = 0``): the ``1 − confidence`` quantile of Beta(k, n − k + 1)."""
    k = np.asarray(k, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        lo = beta.ppf(1.0 - confidence, k, n - k + 1)
    return np.where(k > 0, lo, 0.0)


def cp_upper(k: np.ndarray | int, n: int, confidence: float) -> np.ndarray:
    """One-sided Clopper–Pearson upper bound on a rate from ``k`` successes of ``n``
    (1 when ``k = n``): the ``confidence`` quantile of Beta(k + 1, n − k)."""
    k = np.asarray(k, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        hi = beta.ppf(confidence, k + 1, n - k)
    return np.where(k < n, hi, 1.0)


def empirical_epsilon(scores: np.ndarray, is_member: np.ndarray, delta: float,
                      confidence: float = 0.95) -> dict:
    """The largest ε lower bound any threshold of the attack supports (module docstring).

    Parameters
    ----------
    scores, is_member
        The attack's scores (higher = member) and the ground truth, as for
        :func:`~fedsim.privacy.metrics.attack_metrics`.
    delta
        The δ of the guarantee being audited.
    confidence
        Confidence of the reported bound: every threshold's one-sided Clopper–Pearson rate
        bounds are taken at 1 − (1 − confidence)/T for T thresholds, so the maximum holds.

    Returns
    -------
    dict with ``epsilon_lower_bound`` (0 when no threshold gives evidence), the ``threshold``
    (predict member when score >= threshold; None when ε_lb = 0), ``direction``
    (``"tpr/fpr"``: log((TPR_lo − δ)/FPR_hi); ``"tnr/fnr"``: log((1 − FPR_hi − δ)/(1 − TPR_lo))),
    ``tpr_lower``, ``fpr_upper`` at that threshold, ``confidence``, ``confidence_each`` (the
    level of each threshold's bounds), ``delta``,
    ``thresholds_tried`` (distinct scores), ``n_members``, ``n_nonmembers``.
    """
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    s, m = _check(scores, is_member)
    members, nonmembers = np.sort(s[m]), np.sort(s[~m])
    n_m, n_n = members.size, nonmembers.size
    thresholds = np.unique(s)
    each = 1.0 - (1.0 - confidence) / thresholds.size  # Bonferroni over the thresholds
    tp = n_m - np.searchsorted(members, thresholds, side="left")  # #members with score >= t
    fp = n_n - np.searchsorted(nonmembers, thresholds, side="left")
    tpr_lo = cp_lower(tp, n_m, each)
    fpr_hi = cp_upper(fp, n_n, each)
    with np.errstate(divide="ignore", invalid="ignore"):
        forward = np.where((tpr_lo > delta) & (fpr_hi > 0),
                           np.log((tpr_lo - delta) / fpr_hi), -np.inf)
        backward = np.where((1.0 - fpr_hi - delta > 0) & (tpr_lo < 1.0),
                            np.log((1.0 - fpr_hi - delta) / (1.0 - tpr_lo)), -np.inf)
    best = np.maximum(forward, backward)
    i = int(np.argmax(best))
    out = {"epsilon_lower_bound": 0.0, "threshold": None, "direction": None,
           "tpr_lower": None, "fpr_upper": None}
    if best[i] > 0:
        out = {"epsilon_lower_bound": float(best[i]), "threshold": float(thresholds[i]),
               "direction": "tpr/fpr" if forward[i] >= backward[i] else "tnr/fnr",
               "tpr_lower": float(tpr_lo[i]), "fpr_upper": float(fpr_hi[i])}
    return {**out, "confidence": confidence, "confidence_each": each, "delta": delta,
            "thresholds_tried": int(thresholds.size),
            "n_members": int(n_m), "n_nonmembers": int(n_n)}


@dataclass(frozen=True)
class AccountantClaim:
    """A DP guarantee a run claims: (ε, δ) for neighbouring datasets that differ in one
    ``unit`` (``"sample"``: DP-SGD; ``"client"``: DP-FedAvg), and where summary.json has it."""

    epsilon: float
    delta: float
    unit: str
    source: str


def accountant_claims(summary: Mapping) -> tuple[AccountantClaim, ...]:
    """The finite DP guarantees in a run's summary sections, sample-level ones first.

    Reads ``client_dp`` (sample-level DP-SGD on each client: ``epsilon.max``, ``delta``) and
    ``dp.privacy_spent`` (client-level DP-FedAvg, ``[server.dp]``: ``epsilon``, ``delta``).
    """
    claims = []
    client_dp = summary.get("client_dp") or {}
    eps = client_dp.get("epsilon")
    eps = eps.get("max") if isinstance(eps, Mapping) else eps
    if eps is not None and math.isfinite(eps) and client_dp.get("delta") is not None:
        claims.append(AccountantClaim(float(eps), float(client_dp["delta"]), "sample",
                                      "client_dp.epsilon.max"))
    spent = (summary.get("dp") or {}).get("privacy_spent") or {}
    if spent.get("epsilon") is not None and math.isfinite(spent["epsilon"]):
        claims.append(AccountantClaim(float(spent["epsilon"]), float(spent["delta"]), "client",
                                      "dp.privacy_spent.epsilon"))
    return tuple(claims)


#: Per accountant unit: the factor from its ε to the ε it implies for one sample, and how the
#: sample-level attack relates to it (summary.json ``note``).
_UNITS = {
    "sample": 1.0, "client": 2.0,
}
_UNIT_NOTES = {
    "sample": "the attack and the accountant share the unit (one training sample); "
              "epsilon_lower_bound > accountant_epsilon would contradict the guarantee",
    "client": "the attack is on single samples, the accountant on whole clients (add/remove "
              "one client's data). Changing one sample changes one client's data (replace "
              "= remove + add), so client-level (ε, δ)-DP implies (2ε, (1 + e^ε)δ) for a "
              "sample (group privacy): only epsilon_lower_bound > comparable_epsilon "
              "contradicts the guarantee. A member's effect is also diluted inside its "
              "client's update, so expect epsilon_lower_bound far below accountant_epsilon",
}


def audited_epsilon(scores: Mapping[str, np.ndarray], is_member: np.ndarray,
                    claim: AccountantClaim, confidence: float = 0.95) -> dict:
    """summary.json ``privacy.audited_epsilon``: :func:`empirical_epsilon` of each attack's
    sample-level scores at the accountant's δ, beside the accountant's ε and its unit.

    ``comparable_epsilon`` is the ε the accountant implies for one sample: the accountant's
    own for a sample-level claim, twice it for a client-level one (see ``note``).
    """
    if claim.unit not in _UNIT_NOTES:
        raise ValueError(f"unknown DP unit {claim.unit!r}; expected one of {sorted(_UNIT_NOTES)}")
    out: dict = {name: empirical_epsilon(s, is_member, claim.delta, confidence)
                 for name, s in scores.items()}
    out.update({
        "accountant_epsilon": claim.epsilon,
        "accountant_delta": claim.delta,
        "accountant_from": claim.source,
        "accountant_unit": claim.unit,
        "unit": "sample",
        "comparable_epsilon": _UNITS[claim.unit] * claim.epsilon,
        "note": _UNIT_NOTES[claim.unit],
    })
    return out
