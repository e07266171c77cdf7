"""Derived randomness: one scenario seed, an independent stream per purpose.

Every random choice names its purpose, e.g. ``numpy_rng(seed, "partition")`` or
``torch_generator(seed, "client", cid, "round", r)``, so a run can be resumed or a single
client regenerated exactly, without any global RNG state (as in FedJAX's derived PRNG keys).
"""

from __future__ import annotations

import hashlib
import operator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def _part(value: object) -> str | int:
    if isinstance(value, str):
        return value
    try:
        return operator.index(value)  # Python and numpy integers hash alike
    except TypeError:
        raise TypeError(
            f"seed parts must be str or int, got {type(value).__name__} {value!r}"
        ) from None


def derive_seed(seed: int, *parts: str | int) -> int:
    """A 64-bit seed for ``(seed, *parts)``, stable across processes, platforms and runs.

    Uses BLAKE2b of the parts' ``repr`` rather than Python's salted ``hash()``.
    """
    key = (_part(seed), *(_part(p) for p in parts))
    digest = hashlib.blake2b(repr(key).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def numpy_rng(seed: int, *parts: str | int) -> np.random.Generator:
    """A fresh ``numpy.random.Generator`` for one purpose (see :func:`derive_seed`)."""
    return np.random.default_rng(derive_seed(seed, *parts))


def torch_generator(seed: int, *parts: str | int, device: str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` for one purpose (see :func:`derive_seed`)."""
    import torch  # keep numpy-only users (data partitioning) free of the torch import

    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, *parts) & (2**63 - 1))
    return generator
