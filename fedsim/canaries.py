"""Canaries for one-run privacy audits: random unit directions, who holds each, which are in.

A canary is a random unit direction u in the space of the model's parameters, inserted into
training with probability 1/2 (its bit), so that how much the released model moved along u
tells whether it was in:

- a **gradient canary** (``[privacy.canary_samples]``; Steinke, Nasr & Jagielski, NeurIPS 2023,
  "Privacy Auditing with One (1) Training Run", white-box setting) is a training sample of one
  client whose clipped gradient is C·u: in each DP-SGD step it joins the Poisson batch like
  every other sample and adds C·u to the clipped sum, before the noise
  (:func:`fedsim.client.dpsgd.train_dpsgd`);
- a **canary client** (``[privacy.canary_clients]``; Andrew et al., ICLR 2024, "One-shot
  Empirical Privacy Estimation for Federated Learning") is a client whose update is a
  multiple of u, inserted by the server (:mod:`fedsim.server.canaries`).

Everything is derived from the seed (``(seed, purpose, canary)``), so the client that trains
and the server that audits draw the same directions and bits without sending them; the
module sits with the leaves, below both the client and the audits that score the canaries
(:mod:`fedsim.privacy.audits.sample_canaries`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedsim.rng import numpy_rng

#: purposes of the two kinds of canaries (each draws its own directions and bits)
SAMPLE = "sample-canary"
CLIENT = "client-canary"


def unit_direction(dim: int, seed: int, purpose: str, index: int) -> np.ndarray:
    """Canary ``index``'s direction: a uniformly random unit vector of ``dim`` float32s."""
    v = numpy_rng(seed, purpose, "direction", index).standard_normal(dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


def unit_directions(dim: int, seed: int, purpose: str, indices: Sequence[int]) -> np.ndarray:
    """The directions of ``indices``, stacked ``(len(indices), dim)``."""
    out = np.empty((len(indices), dim), dtype=np.float32)
    for row, i in enumerate(indices):
        out[row] = unit_direction(dim, seed, purpose, int(i))
    return out


def included(count: int, seed: int, purpose: str) -> np.ndarray:
    """Each canary's bit: in (True) with probability 1/2, independently."""
    return numpy_rng(seed, purpose, "included").random(count) < 0.5


def owners(count: int, clients: Sequence[int], seed: int) -> np.ndarray:
    """The client holding each gradient canary, uniformly among ``clients`` (those that train)."""
    return numpy_rng(seed, SAMPLE, "owners").choice(np.asarray(clients), size=count)


def held_by(client: int, count: int, clients: Sequence[int], seed: int) -> np.ndarray:
    """Indices of the gradient canaries ``client`` holds and trains with (its *in* canaries)."""
    mine = (owners(count, clients, seed) == client) & included(count, seed, SAMPLE)
    return np.flatnonzero(mine)


def parameter_size(model: torch.nn.Module) -> int:
    """The dimension canaries live in: every trainable parameter, flattened in order."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
