"""How well a membership-inference attack separates members from non-members.

Reports what ML Privacy Meter and LiRA report (Carlini et al., IEEE S&P 2022): AUC, the best
balanced accuracy, and the true-positive rate at low false-positive rates (1%, 0.1%, 0%),
read off scikit-learn's ROC curve, plus a log-log ROC plot.

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


def attack_metrics(scores: np.ndarray, is_member: np.ndarray) -> dict[str, float]:
    """Summarize an attack: AUC, best balanced accuracy, and TPR at 1%, 0.1% and 0% FPR.

    Parameters
    ----------
    scores
        One score per example; higher means "more likely a member".
    is_member
        Ground truth, boolean (or 0/1), same length.

    Returns
    -------
    dict with ``auc`` (``roc_auc_score``), ``balanced_accuracy`` (the maximum over thresholds
    of (TPR + TNR) / 2, as LiRA's ``sweep``), and ``tpr_at_fpr_1e-2``, ``tpr_at_fpr_1e-3``,
    ``tpr_at_fpr_0`` (see the module docstring for the rule).
    """
    s, m = _check(scores, is_member)
    fpr, tpr, _ = roc_curve(m, s, drop_intermediate=False)
    out = {
        "auc": float(roc_auc_score(m, s)),
        "balanced_accuracy": float(np.max((tpr + 1.0 - fpr) / 2.0)),
    }
    for suffix, x in LOW_FPRS.items():
        out[f"tpr_at_fpr_{suffix}"] = tpr_at_fpr(fpr, tpr, x)
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
