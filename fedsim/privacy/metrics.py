"""How well a membership-inference attack separates members from non-members.

Reports what ML Privacy Meter and LiRA report (Carlini et al., IEEE S&P 2022): AUC, balanced
accuracy, and the true-positive rate at low false-positive rates (1%, 0.1%, 0%), read off
scikit-learn's ROC curve, plus a log-log ROC plot. Each number means what its name says:

- ``tpr_at_fpr_<x>`` is ``None`` (with the reason in ``null_because``) when there are fewer
  than 1/x non-members: no threshold can then have an FPR of x other than 0, and the value
  would silently be ``tpr_at_fpr_0``.
- ``balanced_accuracy`` is that of a threshold chosen on *held-out* data: the pool is split in
  two halves (alternate members and alternate non-members, in pool order), the threshold that
  maximizes balanced accuracy on one half is applied to the other, and the two results are
  averaged (2-fold cross-validation). ``best_balanced_accuracy`` is LiRA's ``sweep``
  statistic, the maximum over thresholds on the very data it scores: optimistic, kept for
  comparison with papers that quote it.

Score convention everywhere in :mod:`fedsim.privacy`: a *higher* score means "more likely a
member".

TPR at FPR ``x`` is ``max(tpr[fpr <= x])``: the largest TPR of an ROC point whose FPR is at most
``x`` (on a non-decreasing ROC, the last such point). This is the rule of ML Privacy Meter's
``compute_attack_results`` (``privacytrustlab/ml_privacy_meter``, ``audit.py``), which also
defines TPR at 0% FPR. LiRA's reference plotting code (``tensorflow/privacy``,
``research/mi_lira_2021/plot.py``) uses the strict ``fpr < x``; the two differ only when an ROC
point lies exactly at FPR ``x`` (e.g. 0.01 with 100·k non-members), and the strict form has no
answer at ``x = 0``.

Ties: every ROC here is ``roc_curve(..., drop_intermediate=False)``, one point per distinct
score. The default ``drop_intermediate=True`` drops points that are collinear with their
neighbours; under tied scores (integer losses, saturated confidences) those are exactly the
points just below a low-FPR target, so TPR at 1% FPR came out low (0.154 instead of 0.198 on
one tied case). ML Privacy Meter and LiRA's plotting code keep the default and share the flaw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from fedsim.files import make_folder, save_figure

#: The low false-positive rates reported by :func:`attack_metrics`, keyed by their suffix.
LOW_FPRS: dict[str, float] = {"1e-2": 1e-2, "1e-3": 1e-3, "0": 0.0}


def _check(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    m = np.asarray(is_member).ravel()
    if s.shape != m.shape:
        raise ValueError(f"scores ({s.size}) and is_member ({m.size}) differ in length")
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise ValueError("is_member must be boolean or 0/1")
        m = m.astype(bool)
    if m.all() or not m.any():
        raise ValueError("need at least one member and one non-member")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    return s, m


def roc_points(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the ROC curve ``(fpr, tpr)`` of an attack: one point per distinct score
    (``sklearn.metrics.roc_curve`` with ``drop_intermediate=False``, see the module docstring).

    The first point is (0, 0); both arrays are non-decreasing.
    """
    s, m = _check(scores, is_member)
    fpr, tpr, _ = roc_curve(m, s, drop_intermediate=False)
    return fpr, tpr


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> float:
    """The largest TPR over ROC points with FPR ``<= max_fpr`` (ML Privacy Meter's rule).

    ``roc_curve`` always starts at (0, 0), so a point exists for every ``max_fpr >= 0``.
    Pass every point (:func:`roc_points`); a curve with collinear points dropped reads low.
    """
    fpr, tpr = np.asarray(fpr), np.asarray(tpr)
    return float(tpr[fpr <= max_fpr].max())


def _best_threshold(s: np.ndarray, m: np.ndarray) -> float:
    """A threshold t (predict member when score >= t) with the largest balanced accuracy on
    (s, m): the first (highest) best score, moved halfway down to the next lower score, so it
    sits inside the interval of equally good thresholds rather than on its edge."""
    fpr, tpr, thresholds = roc_curve(m, s, drop_intermediate=False)
    i = int(np.argmax(tpr - fpr))
    if i == 0 or i + 1 == len(thresholds):  # predict nobody (inf), or everybody
        return float(thresholds[i])
    return float((thresholds[i] + thresholds[i + 1]) / 2)


def _balanced_accuracy_at(s: np.ndarray, m: np.ndarray, threshold: float) -> float:
    guess = s >= threshold
    return float((guess[m].mean() + (~guess[~m]).mean()) / 2)


def heldout_balanced_accuracy(scores: np.ndarray, is_member: np.ndarray) -> float | None:
    """Balanced accuracy of a threshold chosen on held-out data (2-fold, module docstring);
    None when a half would lack a member or a non-member (fewer than 2 of either)."""
    s, m = _check(scores, is_member)
    members, nonmembers = np.flatnonzero(m), np.flatnonzero(~m)
    if members.size < 2 or nonmembers.size < 2:
        return None
    halves = [np.sort(np.r_[members[i::2], nonmembers[i::2]]) for i in (0, 1)]
    out = []
    for fit, score in (halves, halves[::-1]):
        t = _best_threshold(s[fit], m[fit])
        out.append(_balanced_accuracy_at(s[score], m[score], t))
    return float(np.mean(out))


def attack_metrics(scores: np.ndarray, is_member: np.ndarray) -> dict:
    """Summarize an attack: AUC, balanced accuracy, and TPR at 1%, 0.1% and 0% FPR.

    Parameters
    ----------
    scores
        One score per example; higher means "more likely a member".
    is_member
        Ground truth, boolean (or 0/1), same length.

    Returns
    -------
    dict with ``auc`` (``roc_auc_score``), ``balanced_accuracy`` (threshold chosen on held-out
    halves, see the module docstring; None below 2 members or non-members),
    ``best_balanced_accuracy`` (the maximum over thresholds of (TPR + TNR) / 2, as LiRA's
    ``sweep``), and ``tpr_at_fpr_1e-2``, ``tpr_at_fpr_1e-3``, ``tpr_at_fpr_0`` (see the module
    docstring for the rule; None with fewer than 1/x non-members, the reason in
    ``null_because``).
    """
    s, m = _check(scores, is_member)
    fpr, tpr, _ = roc_curve(m, s, drop_intermediate=False)
    out: dict = {
        "auc": float(roc_auc_score(m, s)),
        "balanced_accuracy": heldout_balanced_accuracy(s, m),
        "best_balanced_accuracy": float(np.max((tpr + 1.0 - fpr) / 2.0)),
    }
    null: dict[str, str] = {}
    if out["balanced_accuracy"] is None:
        null["balanced_accuracy"] = ("fewer than 2 members or non-members: no held-out half to "
                                     "choose a threshold on")
    nonmembers = int((~m).sum())
    for suffix, x in LOW_FPRS.items():
        key = f"tpr_at_fpr_{suffix}"
        needed = math.ceil(1 / x - 1e-9) if x > 0 else 1
        if nonmembers < needed:
            out[key] = None
            null[key] = (f"{nonmembers} non-members: an FPR of {x:g} needs at least {needed} "
                         "(below that it reads as the TPR at FPR 0)")
        else:
            out[key] = tpr_at_fpr(fpr, tpr, x)
    if null:
        out["null_because"] = null
    return out


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Write a log-log ROC plot of several attacks to ``path`` (PNG), with the chance line.

    ``curves`` maps a legend name to ``(fpr, tpr, auc)``. Log axes show the low-FPR region
    where attacks differ (Carlini et al. 2022); points at 0 are clipped to the axis floor.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    make_folder(path.parent)
    floor = 1e-5
    for fpr, _, _ in curves.values():
        positive = np.asarray(fpr)[np.asarray(fpr) > 0]
        if positive.size:
            floor = min(floor, float(positive.min()) / 2)
    fig, ax = plt.subplots(figsize=(4.5, 4.0))
    try:
        for name, (fpr, tpr, auc) in curves.items():
            ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=f"{name} (AUC {auc:.3f})")
        ax.plot([floor, 1], [floor, 1], ls="--", color="gray", label="chance")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(floor, 1)
        ax.set_ylim(floor, 1)
        ax.set_xlabel("False positive rate")
        ax.set_ylabel("True positive rate")
        if title:
            ax.set_title(title)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return path
