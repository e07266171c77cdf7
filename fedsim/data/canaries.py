"""Canaries of "The Secret Sharer" (Carlini et al., USENIX Security 2019): random secrets
planted in chosen clients' training text, whose exposure the privacy audit measures
(:mod:`fedsim.privacy.exposure`).

Canary ``i`` is ``prefix + secret``, the secret ``digits`` random digits drawn from
``(seed, "privacy", "canary", i)``, so the data (which plants it) and the audit (which ranks
it) derive the same canaries without passing them around. It goes to client
``clients[i % len(clients)]`` (default: the ``i``-th participating client, cycling), and
``repeats`` copies are inserted into that client's *training* text as speeches of their
own, each after a speech end (a newline) drawn at random: never into the local test tail,
so the canary is a member of the training data only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedsim.config import ExposureConfig
from fedsim.errors import ScenarioError
from fedsim.rng import numpy_rng


@dataclass(frozen=True)
class Canary:
    """One planted secret: its index, client, the secret's digits and the planted text."""

    index: int
    client: int
    secret: str
    text: str


def plan_canaries(cfg: ExposureConfig, participating: Sequence[int], seed: int
                  ) -> tuple[Canary, ...]:
    """The canaries of ``cfg`` for a federation whose participating clients are
    ``participating`` (ScenarioError for a listed client that never trains)."""
    clients = list(cfg.clients)
    for cid in clients:
        if cid not in participating:
            raise ScenarioError(
                f"privacy.exposure.clients lists client {cid}, which is not a participating "
                "client (not a client id, or a holdout client, which never trains); list "
                "participating clients, or [] for the first ones")
    if not clients:
        clients = [participating[i % len(participating)] for i in range(cfg.canaries)]
    out = []
    for i in range(cfg.canaries):
        digits = numpy_rng(seed, "privacy", "canary", i).integers(0, 10, size=cfg.digits)
        secret = "".join(str(int(d)) for d in digits)
        out.append(Canary(i, clients[i % len(clients)], secret, cfg.prefix + secret))
    return tuple(out)


def plant(codes: np.ndarray, planted: Sequence[np.ndarray], boundary: int,
          rng: np.random.Generator) -> np.ndarray:
    """``codes`` (a client's training text as ids) with each of ``planted`` (ids) inserted
    after a random ``boundary`` id (a speech end), followed by ``boundary``: a speech of
    its own. Without any boundary in ``codes``, insertion points are drawn over all of it."""
    ends = np.flatnonzero(codes == boundary) + 1
    if len(ends) == 0:
        ends = np.arange(len(codes) + 1)
    at = rng.choice(ends, size=len(planted))
    pieces, start = [], 0
    for pos, i in sorted(zip(at.tolist(), range(len(planted)))):
        pieces += [codes[start:pos], planted[i], np.array([boundary], dtype=codes.dtype)]
        start = pos
    pieces.append(codes[start:])
    return np.concatenate(pieces)


__all__ = ["Canary", "plan_canaries", "plant"]
