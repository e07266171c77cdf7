"""Synthetic clients generated a cohort at a time (``data.generator = 2``).

Generator 1 (:class:`fedsim.data.federated._SyntheticClients`) seeds one numpy generator per
client and purpose, so a client costs a few generator constructions and small draws; at
tens of samples per client that per-client overhead, not the arithmetic, sets the cost.
Generator 2 draws every random number as a function of ``(seed, client id, stream, index)``
through a counter-based hash (SplitMix64's finalizer, Steele et al., OOPSLA 2014; the
construction of Salmon et al.'s counter-based generators, SC 2011), so a whole cohort's
numbers come from a few array operations, and a client's data is the same whichever
cohort, order, process or engine generates it.

What it draws, from the same model as generator 1 (class prototypes, shifts, contrast,
brightness and noise, :class:`fedsim.data.datasets.SyntheticDataset`): each client's labels
(``iid``: uniform classes; ``dirichlet``: proportions ~ Dirichlet(alpha) as normalised
Gamma(alpha) quantiles, then classes by inverse CDF), its images and its local train/test
split. The numbers differ from generator 1's (another generator), the distributions do
not. A feature partition's domain transform is the partition's, applied per client as under
generator 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.special import gammaincinv

from fedsim.data.datasets import SyntheticDataset
from fedsim.errors import ScenarioError
from fedsim.rng import derive_seed

#: the label kinds generator 2 draws (each client's size is ``data.samples_per_client``)
LABEL_KINDS = ("iid", "dirichlet")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

# streams: one per purpose, so no two purposes share a number
LABEL_P, LABEL_DRAW, SHIFT, CONTRAST, BRIGHTNESS, NOISE, SPLIT = range(7)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 arrays (multiplication wraps modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def client_keys(seed: int, cids: Sequence[int]) -> np.ndarray:
    """One 64-bit key per client: a function of ``(seed, client id)`` alone."""
    base = np.uint64(derive_seed(seed, "synthetic", "generator-2"))
    ids = np.asarray(cids, dtype=np.uint64)
    return _mix(base ^ _mix(ids * _GOLDEN + np.uint64(1)))


def uniforms(keys: np.ndarray, stream: int, count: int) -> np.ndarray:
    """``(clients, count)`` float64 uniforms in (0, 1), number ``j`` of ``stream`` for each key."""
    counters = np.arange(count, dtype=np.uint64) + (np.uint64(stream) << np.uint64(40))
    bits = _mix(keys[:, None] ^ _mix(counters * _GOLDEN))
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def normals(keys: np.ndarray, stream: int, count: int) -> np.ndarray:
    """``(clients, count)`` float32 standard normals: Box–Muller on the two 24-bit halves
    of each hash (float32 arithmetic; the tails end near 5.8 standard deviations)."""
    half = (count + 1) // 2
    counters = np.arange(half, dtype=np.uint64) + (np.uint64(stream) << np.uint64(40))
    bits = _mix(keys[:, None] ^ _mix(counters * _GOLDEN))
    u1 = ((bits >> np.uint64(40)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)
    u2 = (bits & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    angle = np.float32(2.0 * np.pi) * u2
    out = np.empty((len(keys), 2 * half), dtype=np.float32)
    np.multiply(r, np.cos(angle), out=out[:, :half])
    np.multiply(r, np.sin(angle), out=out[:, half:])
    return out[:, :count]


def check_generator(label_kind: str) -> None:
    """Refuse a label partition generator 2 does not draw."""
    if label_kind not in LABEL_KINDS:
        raise ScenarioError(
            f"data.generator = 2 draws the labels of the {' and '.join(LABEL_KINDS)} "
            f"partitions, not {label_kind!r}; set data.generator = 1 or a partition of "
            f"{', '.join(LABEL_KINDS)}"
        )


def labels(keys: np.ndarray, label_kind: str, alpha: float, num_classes: int, n: int
           ) -> np.ndarray:
    """``(clients, n)`` int64 labels for each key."""
    if label_kind == "iid":
        u = uniforms(keys, LABEL_DRAW, n)
        return np.minimum((u * num_classes).astype(np.int64), num_classes - 1)
    g = gammaincinv(alpha, uniforms(keys, LABEL_P, num_classes))  # Gamma(alpha) quantiles
    total = g.sum(axis=1, keepdims=True)
    bad = ~np.isfinite(total[:, 0]) | (total[:, 0] <= 0)  # underflow at tiny alpha
    if bad.any():  # one class, as generator 1 does
        g[bad] = np.eye(num_classes)[g[bad].argmax(axis=1)]
        total = g.sum(axis=1, keepdims=True)
    cdf = np.cumsum(g / total, axis=1)
    u = uniforms(keys, LABEL_DRAW, n)
    drawn = (u[:, :, None] >= cdf[:, None, :-1]).sum(axis=2)
    return drawn.astype(np.int64)


def images(dataset: SyntheticDataset, keys: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(clients, n, C, S, S)`` float32 samples of labels ``y`` ``(clients, n)``: the
    prototypes of :class:`~fedsim.data.datasets.SyntheticDataset`, shifted by up to a
    pixel, with its contrast, brightness and noise."""
    m, n = y.shape
    shifts = np.minimum((uniforms(keys, SHIFT, 2 * n) * 3).astype(np.int64), 2)
    x = dataset._windows[y, shifts[:, :n], shifts[:, n:]]  # (m, n, C, S, S)
    contrast = (0.8 + 0.4 * uniforms(keys, CONTRAST, n)).astype(np.float32)
    brightness = 0.1 * normals(keys, BRIGHTNESS, n)
    noise = normals(keys, NOISE, n * int(np.prod(x.shape[2:]))).reshape(x.shape)
    x = (x * contrast[:, :, None, None, None] + brightness[:, :, None, None, None]
         + np.float32(dataset.cfg.noise) * noise)
    x /= np.float32(np.sqrt(1.0 + dataset.cfg.noise**2))
    return x


def splits(keys: np.ndarray, n: int, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """Each client's local (train, test) sample indices, ``(clients, n - n_test)`` and
    ``(clients, n_test)``, sorted: a random permutation's tail and head."""
    order = np.argsort(uniforms(keys, SPLIT, n), axis=1, kind="stable")
    return np.sort(order[:, n_test:], axis=1), np.sort(order[:, :n_test], axis=1)
