"""RMIA (Zarifzadeh et al., "Low-Cost High-Power Membership Inference Attacks", ICML 2024),
offline: the likelihood ratio Pr(x|θ)/Pr(x) of a target example is compared with that of
population examples z; the score is the fraction of z it dominates (:func:`rmia_scores`).

In a run the reference models are the membership audit's shadow federations and the
population is ``privacy.mia.population`` examples of the global test set, never trained on by
the target or any shadow (:mod:`fedsim.privacy.audits.membership`); options:
``[privacy.mia.rmia]``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from fedsim.config import RmiaConfig
from fedsim.privacy.attacks.base import MembershipAttack, MiaInputs, register_attack
from fedsim.privacy.audits.base import POPULATION, SHADOWS


def rmia_scores(
    target_prob: np.ndarray,
    ref_prob: np.ndarray,
    ref_in: np.ndarray,
    pop_target_prob: np.ndarray,
    pop_ref_prob: np.ndarray,
    a: float = 0.3,
    gamma: float = 1.0,
) -> np.ndarray:
    """Offline RMIA scores (Zarifzadeh et al., ICML 2024) from reference-model probabilities.

    For an example x with true label y, Pr(x|θ) is the target model's probability of y, and
    Pr(x) is estimated from the reference (shadow) models for which x was OUT, with the
    paper's offline linear approximation ``Pr(x) = ½((1 + a)·Pr_OUT(x) + (1 − a))``, Pr_OUT the
    mean over OUT references. LR(x) = Pr(x|θ)/Pr(x), LR(z) likewise for population examples z
    (OUT for the target and every reference). The score is the fraction of z with
    LR(x)/LR(z) > γ. Defaults follow ML Privacy Meter's ``run_rmia``
    (``privacytrustlab/ml_privacy_meter``): ``offline_a = 0.3`` and γ = 1 (``ratios > 1.0``).

    Parameters
    ----------
    target_prob
        Target model's probability of each example's label, shape (n,).
    ref_prob, ref_in
        Reference models' probabilities (k, n) and IN masks (k, n); only OUT entries are used.
    pop_target_prob, pop_ref_prob
        The same for the population: (m,) for the target, (k, m) for the references.
    a
        Offline coefficient in [0, 1]; ``a = 1`` trusts Pr_OUT as Pr(x) unchanged.
    gamma
        Threshold on LR(x)/LR(z), > 0.

    Returns
    -------
    Scores in [0, 1], shape (n,), higher = more likely a member.

    Notes
    -----
    Computed in log space, as ``#{z : log LR(z) < log LR(x) − log γ} / m`` with a sorted
    population, so memory is O(n + m) rather than the reference's (n, m) matrix; the two
    differ only where LR(x)/LR(z) equals γ to the last bit.
    """
    target = np.asarray(target_prob, dtype=np.float64)
    ref = np.asarray(ref_prob, dtype=np.float64)
    keep = np.asarray(ref_in, dtype=bool)
    pop_t = np.asarray(pop_target_prob, dtype=np.float64)
    pop_r = np.asarray(pop_ref_prob, dtype=np.float64)
    if ref.ndim != 2 or ref.shape != keep.shape or target.shape != (ref.shape[1],):
        raise ValueError(f"expected target_prob (n,), ref_prob and ref_in (k, n); got "
                         f"{target.shape}, {ref.shape}, {keep.shape}")
    if pop_r.ndim != 2 or pop_t.shape != (pop_r.shape[1],) or pop_r.shape[0] != ref.shape[0]:
        raise ValueError(f"expected pop_target_prob (m,) and pop_ref_prob (k={ref.shape[0]}, "
                         f"m); got {pop_t.shape}, {pop_r.shape}")
    if pop_t.size == 0:
        raise ValueError("RMIA needs at least one population example")
    if not 0.0 <= a <= 1.0 or gamma <= 0:
        raise ValueError(f"need 0 <= a <= 1 and gamma > 0; got a={a}, gamma={gamma}")
    out = ~keep
    if not out.any(axis=0).all():
        raise ValueError("every example needs at least one OUT reference model "
                         "(use >= 2 shadows: each example is then OUT for about half)")
    p_out = np.where(out, ref, 0.0).sum(axis=0) / out.sum(axis=0)

    def log_lr(p_theta: np.ndarray, p_out_mean: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):  # a probability that underflowed to 0: LR = 0
            return np.log(p_theta) - np.log(0.5 * ((1 + a) * p_out_mean + (1 - a)))

    lr_x = log_lr(target, p_out)
    lr_z = np.sort(log_lr(pop_t, pop_r.mean(axis=0)))
    return np.searchsorted(lr_z, lr_x - np.log(gamma), side="left") / lr_z.size


@register_attack("rmia")
class Rmia(MembershipAttack):
    """Reported as ``mia.rmia``; the shadows serve as OUT reference models."""

    needs = frozenset({SHADOWS, POPULATION})

    @staticmethod
    def scores(inputs: MiaInputs, options: RmiaConfig) -> dict[str, np.ndarray]:
        assert inputs.shadow_conf is not None and inputs.shadow_in is not None
        assert inputs.pop_confidences is not None and inputs.pop_shadow_conf is not None
        return {"rmia": rmia_scores(expit(inputs.confidences), expit(inputs.shadow_conf),
                                    inputs.shadow_in, expit(inputs.pop_confidences),
                                    expit(inputs.pop_shadow_conf), a=options.a,
                                    gamma=options.gamma)}

    @staticmethod
    def describe(options: RmiaConfig) -> dict[str, dict]:
        return {"mia_pool": {"rmia_a": options.a, "rmia_gamma": options.gamma}}
