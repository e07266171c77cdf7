"""Canary exposure: "The Secret Sharer" (Carlini, Liu, Erlingsson, Kos & Song, USENIX Security
2019), on the global model and on client uploads.

A canary is ``prefix + secret`` with a secret of ``k`` random digits planted in a client's
training text (:mod:`fedsim.data.canaries`). The candidate space ``R`` is every string of
``k`` digits, ``|R| = 10**k``. A model ranks the candidates by log-perplexity,

    Px(s) = -sum_j log2 Pr(s_j | context, s_1..s_{j-1})   over the k secret digits,

each digit predicted from the window of ``seq_len`` characters ending just before it: the
canary's preceding speech end (``"\\n"``), the prefix and the digits so far, left-padded
with spaces (LEAF's padding character) to the window. The prefix's own characters cost the
same for every candidate, so they are left out of ``Px``; ranks do not change. Then

    exposure = log2 |R| - log2 rank,   rank = 1 + #{r in R : Px(r) < Px(canary)},

from 0 (the canary is the least likely) to ``log2 |R|`` (the most likely: memorized).

Scoring every candidate (:func:`all_log_perplexities`) walks the digit tree: level ``j``
scores the ``10**j`` prefixes of ``j`` digits in one batch, ``(10**k - 1) / 9`` windows in
all (11,111 for 5 digits), not ``k · 10**k``. Where ``R`` is too large, the rank is
estimated from a uniform sample of candidates as the paper does
(:func:`sampled_exposure`): ``rank ≈ 1 + q (|R| - 1)``, ``q`` the sample's fraction less
likely-perplexed than the canary; and, since a sample cannot resolve ranks below ``|R| /
n``, the paper's extrapolation too: a skew-normal fit to the sample's log-perplexities,
``exposure ≈ -log2 CDF(Px(canary))`` (:func:`fitted_exposure`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats
from torch import nn

#: log2 e: nats to bits
_BITS = 1.0 / math.log(2.0)
BATCH = 1024


def _windows(context: np.ndarray, digits: np.ndarray, seq_len: int, pad: int) -> torch.Tensor:
    """``(n, seq_len)`` windows: ``context`` then each row of ``digits`` (n, j), keeping the
    last ``seq_len`` characters, left-padded with ``pad``."""
    n, j = digits.shape
    rows = np.concatenate([np.broadcast_to(context, (n, len(context))), digits], axis=1)
    if rows.shape[1] >= seq_len:
        rows = rows[:, rows.shape[1] - seq_len:]
    else:
        rows = np.concatenate([np.full((n, seq_len - rows.shape[1]), pad, dtype=rows.dtype),
                               rows], axis=1)
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))


@torch.no_grad()
def _next_log_probs(model: nn.Module, x: torch.Tensor, device: torch.device) -> np.ndarray:
    """Log-probabilities (nats, float64) of the next character after each window of ``x``."""
    out = []
    for start in range(0, len(x), BATCH):
        z = model(x[start:start + BATCH].to(device)).double()
        out.append(torch.log_softmax(z, dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def all_log_perplexities(model: nn.Module, context: np.ndarray, digit_ids: Sequence[int],
                         k: int, seq_len: int, pad: int) -> np.ndarray:
    """``Px`` (bits) of every ``k``-digit candidate, in numeric order (``"00..0"`` first).

    ``digit_ids`` are the vocabulary ids of ``"0".."9"``; ``context`` the ids before the
    first digit. Level ``j`` runs the model once on each of the ``10**j`` ``j``-digit
    prefixes and adds the log-probability of each next digit to its prefix's total.
    """
    ids = np.asarray(digit_ids, dtype=np.int64)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        totals = np.zeros(1)
        prefixes = np.zeros((1, 0), dtype=np.int64)  # digit values 0..9, (10**j, j)
        for _ in range(k):
            lp = _next_log_probs(model, _windows(context, ids[prefixes], seq_len, pad),
                                 device)[:, ids]  # (10**j, 10)
            totals = (totals[:, None] + lp).reshape(-1)
            prefixes = np.concatenate([np.repeat(prefixes, 10, axis=0),
                                       np.tile(np.arange(10), len(prefixes))[:, None]], axis=1)
    finally:
        model.train(was_training)
    return -totals * _BITS


def log_perplexities(model: nn.Module, context: np.ndarray, digit_ids: Sequence[int],
                     candidates: np.ndarray, seq_len: int, pad: int) -> np.ndarray:
    """``Px`` (bits) of each row of ``candidates`` (``(n, k)`` digit values 0..9)."""
    ids = np.asarray(digit_ids, dtype=np.int64)
    candidates = np.asarray(candidates, dtype=np.int64)
    n, k = candidates.shape
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        totals = np.zeros(n)
        for j in range(k):
            lp = _next_log_probs(model, _windows(context, ids[candidates[:, :j]], seq_len, pad),
                                 device)
            totals += lp[np.arange(n), ids[candidates[:, j]]]
    finally:
        model.train(was_training)
    return -totals * _BITS


def rank_of(canary: float, candidates: np.ndarray) -> int:
    """``1 +`` the candidates with a strictly lower log-perplexity than ``canary``."""
    return 1 + int(np.count_nonzero(np.asarray(candidates) < canary))


def exposure(canary: float, all_candidates: np.ndarray) -> float:
    """``log2 |R| - log2 rank`` of ``canary``'s log-perplexity among every candidate's
    (``all_candidates`` holds all of ``R``, the canary's own value included)."""
    return math.log2(len(all_candidates)) - math.log2(rank_of(canary, all_candidates))


def sampled_exposure(canary: float, sample: np.ndarray, space: int) -> float:
    """Exposure from a uniform ``sample`` of ``R`` (``|R| = space``): the rank estimated as
    ``1 + q (space - 1)``, ``q`` the fraction of the sample with lower log-perplexity."""
    q = np.count_nonzero(np.asarray(sample) < canary) / len(sample)
    return math.log2(space) - math.log2(1.0 + q * (space - 1))


def fitted_exposure(canary: float, sample: np.ndarray, space: int) -> float:
    """The paper's extrapolation: ``-log2 F(canary)`` for ``F`` the CDF of a skew-normal fit
    to the sample's log-perplexities, clipped to ``[0, log2 space]``."""
    a, loc, scale = stats.skewnorm.fit(np.asarray(sample, dtype=float))
    log_cdf = stats.skewnorm.logcdf(canary, a, loc, scale)
    return float(min(max(-log_cdf * _BITS, 0.0), math.log2(space)))


__all__ = [
    "all_log_perplexities",
    "exposure",
    "fitted_exposure",
    "log_perplexities",
    "rank_of",
    "sampled_exposure",
]
