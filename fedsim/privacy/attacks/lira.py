"""LiRA (Carlini et al., "Membership Inference Attacks From First Principles", IEEE S&P 2022).

Shadow models trained on random halves give, per example, the distribution of its
logit-scaled confidence when it was IN and when it was OUT of training; the target model's
confidence is scored by a Gaussian likelihood ratio. The statistics follow the authors'
reference code (``tensorflow/privacy``, ``research/mi_lira_2021/plot.py``,
``generate_ours`` / ``generate_ours_offline``): median for the mean, population standard
deviation (``ddof=0``), and a fixed variance taken as ``np.std`` over all values of a group.
The offline test is the paper's one-sided one by default; the reference code's two-sided
variant is available (see :func:`lira_scores`). In a run, the shadows are shadow
*federations* (:mod:`fedsim.privacy.audits.membership`); options: ``[privacy.mia.lira]``.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import norm

from fedsim.config import LiraConfig
from fedsim.privacy.attacks.base import MembershipAttack, MiaInputs, register_attack
from fedsim.privacy.audits.base import SHADOWS

# The reference adds 1e-30 to every standard deviation so a zero spread cannot divide by zero.
_STD_EPS = 1e-30


def _group_stats(
    values: np.ndarray, mask: np.ndarray, fix_variance: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example median and standard deviation of ``values[mask]`` along axis 0.

    Examples with no value in the group fall back to the group's global median and standard
    deviation; examples with a single value keep it as their mean but take the global
    standard deviation (one value has no spread). With ``fix_variance`` the global standard
    deviation is used for every example, as in the reference.
    """
    if not mask.any():
        raise ValueError("no shadow model has any example in this group (IN or OUT)")
    pooled = values[mask]
    global_mu, global_sd = float(np.median(pooled)), float(np.std(pooled))
    masked = np.where(mask, values, np.nan)
    count = mask.sum(axis=0)
    with warnings.catch_warnings():
        # 'All-NaN slice' / 'Degrees of freedom' warnings: those examples take the fallback.
        warnings.simplefilter("ignore", RuntimeWarning)
        mu = np.nanmedian(masked, axis=0)
        sd = np.nanstd(masked, axis=0)
    mu = np.where(count > 0, mu, global_mu)
    sd = np.full_like(mu, global_sd) if fix_variance else np.where(count > 1, sd, global_sd)
    return mu, sd + _STD_EPS


def lira_scores(
    target_conf: np.ndarray,
    shadow_conf: np.ndarray,
    shadow_in: np.ndarray,
    online: bool = True,
    fix_variance: bool = False,
    one_sided: bool = True,
) -> np.ndarray:
    """LiRA membership scores (Carlini et al. 2022) from shadow-model confidences.

    Parameters
    ----------
    target_conf
        Logit-scaled confidence φ of the attacked model on each example, shape (n,).
    shadow_conf
        φ of each shadow model on each example, shape (k, n).
    shadow_in
        Boolean (k, n): was example j in shadow model i's training set.
    online
        Online LiRA fits N(μ_in, σ_in) and N(μ_out, σ_out) per example and scores
        log N(φ; μ_in, σ_in) − log N(φ; μ_out, σ_out). Offline LiRA uses OUT shadows only.
    fix_variance
        Use one standard deviation per group (IN, OUT) for all examples — the paper's advice
        when shadows are few (fewer than ~64). As in the reference, it is ``np.std`` of all
        the group's values (so it includes the spread between examples). The reference's
        online branch sets ``std_out = np.std(dat_in)``, an apparent slip; we use the OUT
        values for the OUT group.
    one_sided
        Offline only. ``True`` (default) is the paper's one-sided test (members have
        *higher* confidence), Λ = 1 − Pr[Z > φ] with Z ~ N(μ_out, σ_out²), returned as the
        equivalently ordered −log Pr[Z > φ] (``-norm.logsf``), which keeps its resolution
        where Λ would round to 1. ``False`` is what the reference code does: score =
        −log N(φ; μ_out, σ_out), "φ is unlikely under OUT" in either direction; on our
        digits tests it is much weaker (AUC ≈ 0.53 against ≈ 0.66 one-sided).

    Returns
    -------
    Scores of shape (n,), higher = more likely a member.

    Notes
    -----
    Means are medians, as in the reference. Unlike the reference, which truncates every
    example to the smallest IN (and OUT) count so its arrays are rectangular, each example
    uses all of its shadows. An example with no IN (or no OUT) shadow falls back to the
    group's global median and standard deviation; one with a single shadow in a group takes
    the global standard deviation. With several queries per example (augmentations), the
    reference averages the per-query scores: call this once per query and average.
    """
    target = np.asarray(target_conf, dtype=np.float64)
    conf = np.asarray(shadow_conf, dtype=np.float64)
    keep = np.asarray(shadow_in, dtype=bool)
    if conf.ndim != 2 or conf.shape != keep.shape or target.shape != (conf.shape[1],):
        raise ValueError(
            f"expected target_conf (n,), shadow_conf and shadow_in (k, n); got "
            f"{target.shape}, {conf.shape}, {keep.shape}"
        )
    mu_out, sd_out = _group_stats(conf, ~keep, fix_variance)
    if not online:
        if one_sided:
            return -norm.logsf(target, mu_out, sd_out)
        return -norm.logpdf(target, mu_out, sd_out)
    mu_in, sd_in = _group_stats(conf, keep, fix_variance)
    return norm.logpdf(target, mu_in, sd_in) - norm.logpdf(target, mu_out, sd_out)


@register_attack("lira")
class Lira(MembershipAttack):
    """Reported as ``mia.lira_online`` and ``mia.lira_offline``."""

    needs = frozenset({SHADOWS})

    @staticmethod
    def scores(inputs: MiaInputs, options: LiraConfig) -> dict[str, np.ndarray]:
        assert inputs.shadow_conf is not None and inputs.shadow_in is not None
        args = (inputs.confidences, inputs.shadow_conf, inputs.shadow_in)
        return {"lira_online": lira_scores(*args, True, fix_variance=options.fix_variance),
                "lira_offline": lira_scores(*args, False, fix_variance=options.fix_variance)}

    @staticmethod
    def describe(options: LiraConfig) -> dict[str, dict]:
        return {"shadows": {"fix_variance": options.fix_variance}}
