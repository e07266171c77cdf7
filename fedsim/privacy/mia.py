"""What every membership attack reads: a model's per-example outputs, and the IN/OUT split of
the shadow (reference) models.

The attacks themselves are one module each in :mod:`fedsim.privacy.attacks` (loss, LiRA,
RMIA), with every score following one convention: higher means "more likely a member", ready
for :func:`fedsim.privacy.metrics.attack_metrics`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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
