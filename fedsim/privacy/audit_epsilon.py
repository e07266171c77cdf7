"""Membership ε: what a membership attack's ROC would certify about ε if its examples were
independent trials — an indication for one training run, not a bound.

An (ε, δ)-DP mechanism limits every membership test: at any threshold,
TPR ≤ e^ε·FPR + δ, and, for the complementary decision, TNR ≤ e^ε·FNR + δ
(Kairouz et al. 2015). So an observed attack implies ε ≥ log((TPR − δ)/FPR) and
ε ≥ log((1 − FPR − δ)/(1 − TPR)). Following Jagielski et al. (NeurIPS 2020, "Auditing
Differentially Private Machine Learning") and Nasr et al. (IEEE S&P 2021, "Adversary
Instantiation"), the rates are replaced by one-sided Clopper–Pearson bounds — a lower bound on
TPR from #true positives of #members, an upper bound on FPR from #false positives of
#non-members. We take both directions at every distinct score threshold t (ties handled as in
:mod:`fedsim.privacy.metrics`) and report the maximum.

**Confidence.** Each of the T thresholds contributes two rate bounds, and the threshold is
chosen on the same data, so every one of the 2T bounds is taken at 1 − (1 − c)/(2T)
(Bonferroni): then all hold together with confidence c, and so does the maximum
(``confidence_each``). Two bounds at c each would hold jointly only at 1 − 2(1 − c) (90% for
c = 95%). Without any correction a chance attack on 500 + 500 examples (~1000 thresholds,
c = 0.95) gave a positive ε in 3 of 20 draws.

**What it is not.** :func:`empirical_epsilon` is a valid lower bound when its examples are
independent trials — one training run per example, as in Jagielski et al. In a fedsim run the
pool's examples all come from one training run, so they are not; the run's summary therefore
calls the number ``epsilon_if_independent`` (``privacy.membership_epsilon``) and keeps it as
evidence beside the accountant's ε. Bounds valid for one run come from canaries
(:mod:`fedsim.privacy.one_run`, Steinke, Nasr & Jagielski, NeurIPS 2023) and estimates from
canary clients (:mod:`fedsim.privacy.canary`, Andrew et al., ICLR 2024).
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
        Confidence of the reported bound: each threshold's two one-sided Clopper–Pearson rate
        bounds are taken at 1 − (1 − confidence)/(2T) for T thresholds, so all 2T hold
        together, and so does the maximum.

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
    each = 1.0 - (1.0 - confidence) / (2 * thresholds.size)  # Bonferroni: 2 bounds a threshold
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
    ``unit`` (``"sample"``: DP-SGD; ``"client"``: DP-FedAvg) under ``relation``
    (``"add_or_remove_one"`` or ``"replace_one"``), and where summary.json has it."""

    epsilon: float
    delta: float
    unit: str
    source: str
    relation: str = "add_or_remove_one"


def accountant_claims(summary: Mapping) -> tuple[AccountantClaim, ...]:
    """The finite DP guarantees in a run's summary sections, sample-level ones first.

    Reads ``client_dp`` (sample-level DP-SGD on each client: ``epsilon.max``, ``delta``;
    Poisson batches, add/remove) and ``dp.privacy_spent`` (client-level, ``[server.dp]``:
    ``epsilon``, ``delta``, ``relation``).
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
                                      "dp.privacy_spent.epsilon",
                                      spent.get("relation", "add_or_remove_one")))
    return tuple(claims)


def comparable_epsilon(claim: AccountantClaim) -> tuple[float, str]:
    """The ε the accountant implies for one training sample, and why.

    A sample-level claim is compared as it is. Under a client-level claim, changing one
    sample changes one client's data: that *is* one replaced client (replace-one: ε), or one
    removed and one added (add/remove: group privacy gives (2ε, (1 + e^ε)δ)).
    """
    if claim.unit == "sample":
        return claim.epsilon, ("the attack and the accountant share the unit (one training "
                               "sample); epsilon_if_independent > accountant_epsilon would "
                               "contradict the guarantee if the examples were independent")
    if claim.unit != "client":
        raise ValueError(f"unknown DP unit {claim.unit!r}; expected 'sample' or 'client'")
    diluted = (". A member's effect is also diluted inside its client's update, so expect "
               "epsilon_if_independent far below accountant_epsilon")
    if claim.relation == "replace_one":
        return claim.epsilon, ("the attack is on single samples, the accountant on whole "
                               "clients under replace-one: changing one sample replaces one "
                               "client's data, so the client-level ε applies as it is" + diluted)
    return 2 * claim.epsilon, ("the attack is on single samples, the accountant on whole "
                               "clients under add/remove: changing one sample = removing one "
                               "client's data and adding another, so the guarantee for a sample "
                               "is (2ε, (1 + e^ε)δ) by group privacy" + diluted)


MEMBERSHIP_WHAT = (
    "the largest ε a threshold on the final attack's scores would certify (Clopper–Pearson, "
    "both directions, Bonferroni over 2 bounds per threshold) if the pool's examples were "
    "independent trials; they come from one training run, so this is an indication, not a "
    "lower bound (privacy.canary_audit gives bounds valid for one run)")


def membership_epsilon(scores: Mapping[str, np.ndarray], is_member: np.ndarray,
                       claim: AccountantClaim, confidence: float = 0.95) -> dict:
    """summary.json ``privacy.membership_epsilon``: :func:`empirical_epsilon` of each attack's
    sample-level scores at the accountant's δ, renamed ``epsilon_if_independent`` (module
    docstring), beside the accountant's ε, its unit and relation, and the ε it implies for one
    sample (``comparable_epsilon``, see ``note``)."""
    comparable, note = comparable_epsilon(claim)
    out: dict = {}
    for name, s in scores.items():
        got = empirical_epsilon(s, is_member, claim.delta, confidence)
        out[name] = {"epsilon_if_independent": got.pop("epsilon_lower_bound"), **got}
    out.update({
        "what": MEMBERSHIP_WHAT,
        "valid_for_one_run": False,
        "accountant_epsilon": claim.epsilon,
        "accountant_delta": claim.delta,
        "accountant_from": claim.source,
        "accountant_unit": claim.unit,
        "accountant_relation": claim.relation,
        "unit": "sample",
        "comparable_epsilon": comparable,
        "note": note,
    })
    return out
