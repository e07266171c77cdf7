"""Summary statistics of per-client values (accuracies, attack AUCs): one function, shared by
the server's evaluation and the privacy audits, so every distribution in ``summary.json``
has the same fields."""

from __future__ import annotations

import numpy as np


def distribution(values: list[float], weights: list[int] | None = None) -> dict[str, float]:
    """Mean, example-weighted mean, std, median, p10, p90, min, max and count of ``values``."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0}
    out = {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "median": float(np.median(v)),
        "p10": float(np.percentile(v, 10)),
        "p90": float(np.percentile(v, 90)),
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(v.size),
    }
    if weights is not None:
        w = np.asarray(weights, dtype=float)[np.isfinite(np.asarray(values, dtype=float))]
        out["weighted_mean"] = float((v * w).sum() / w.sum()) if w.sum() > 0 else out["mean"]
    return out
