"""Membership-inference attacks: the loss threshold and LiRA, as pure functions.

Every score follows one convention: higher means "more likely a member", ready for
:func:`fedsim.privacy.metrics.attack_metrics`.

- Loss attack (Yeom et al., CSF 2018): members have lower loss, so the score is ``-loss``.
- LiRA (Carlini et al., "Membership Inference Attacks From First Principles", IEEE S&P 2022):
  shadow models trained on random halves give, per example, the distribution of its
  logit-scaled confidence when it was IN and when it was OUT of training; the target model's
  confidence is scored by a Gaussian likelihood ratio. The statistics follow the authors'
  reference code (``tensorflow/privacy``, ``research/mi_lira_2021/plot.py``,
  ``generate_ours`` / ``generate_ours_offline``): median for the mean, population standard
  deviation (``ddof=0``), and a fixed variance taken as ``np.std`` over all values of a group.
  The offline test is the paper's one-sided one by default; the reference code's two-sided
  variant is available (see :func:`lira_scores`).
- RMIA (Zarifzadeh et al., "Low-Cost High-Power Membership Inference Attacks", ICML 2024):
  the likelihood ratio Pr(x|θ)/Pr(x) of a target example is compared with that of population
  examples z; the score is the fraction of z it dominates (see :func:`rmia_scores`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn

# The reference adds 1e-30 to every standard deviation so a zero spread cannot divide by zero.
_STD_EPS = 1e-30


@torch.no_grad()
def per_example_outputs(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example cross-entropy loss and LiRA's logit-scaled confidence of ``model``.

    The confidence is φ = log p_y − log Σ_{y'≠y} p_{y'} (Carlini et al. 2022), computed from the
    logits as z_y − logsumexp_{y'≠y} z_{y'}, which is exact and does not saturate when p_y → 1.
    The model runs in eval mode (BN uses running statistics, as a deployed model would); its
    previous train/eval mode is restored afterwards.

    Returns
    -------
    (losses, confidences): two float64 arrays of shape (n,).
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
    was_training = model.training
    model.eval()
    losses, confs = [], []
    try:
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size].long()
            z = model(xb).double()
            losses.append(F.cross_entropy(z, yb, reduction="none"))
            z_y = z.gather(1, yb[:, None]).squeeze(1)
            others = z.scatter(1, yb[:, None], float("-inf"))
            confs.append(z_y - torch.logsumexp(others, dim=1))
    finally:
        model.train(was_training)
    if not losses:
        return np.zeros(0), np.zeros(0)
    return torch.cat(losses).cpu().numpy(), torch.cat(confs).cpu().numpy()


def loss_attack(losses: np.ndarray) -> np.ndarray:
    """Loss-threshold attack (Yeom et al. 2018): score = −loss, so low loss reads as member."""
    return -np.asarray(losses, dtype=np.float64)


def shadow_split(n: int, num_shadows: int, rng: np.random.Generator) -> np.ndarray:
    """Random IN/OUT mask ``(num_shadows, n)`` for training shadow models.

    Each example is IN for exactly ``num_shadows // 2`` shadows (one more for a random half of
    the examples when ``num_shadows`` is odd), so every example has both IN and OUT shadows as
    soon as there are two. This is the balanced keep mask of LiRA's reference ``train.py``
    (a random rank per example and shadow, kept when the rank falls below half); each shadow's
    training set then holds about ``n / 2`` examples.
    """
    if n < 0 or num_shadows < 1:
        raise ValueError("need n >= 0 and num_shadows >= 1")
    # A random permutation of the shadows per example; the first `quota` of them keep it.
    order = rng.random((num_shadows, n)).argsort(axis=0)
    quota = np.full(n, num_shadows // 2)
    if num_shadows % 2:
        # Odd count: a random half of the examples is IN once more, keeping shadows near n/2.
        quota[rng.permutation(n)[: n // 2]] += 1
    return order < quota[None, :]


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
