"""Feature skew: a per-client domain transform on NCHW float images (Li et al. 2022).

Client ``i`` of a ``feature`` partition gets ``transforms[i % len(transforms)]`` with a
strength in [0.25, 1] drawn from ``(seed, "domain", i)``, so the same client always sees the
same domain. Transforms are vectorized numpy, take ``(x, strength, rng)`` and return a new
float32 array; images are already standardized, so "pixel values" below are standardized.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from fedsim.config import PartitionConfig
from fedsim.registry import Registry
from fedsim.rng import numpy_rng

Transform = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]

DOMAINS: Registry[Transform] = Registry("domain transform")

STRENGTH_RANGE = (0.25, 1.0)


def client_domain(cfg: PartitionConfig, seed: int, cid: int) -> tuple[str, float]:
    """The transform name and strength client ``cid`` gets under a feature partition."""
    name = cfg.transforms[cid % len(cfg.transforms)]
    strength = float(numpy_rng(seed, "domain", cid).uniform(*STRENGTH_RANGE))
    return name, strength


def apply_domain(x: np.ndarray, cfg: PartitionConfig, seed: int, cid: int) -> np.ndarray:
    """Client ``cid``'s domain transform applied to ``x`` (deterministic in seed and cid)."""
    name, strength = client_domain(cfg, seed, cid)
    transform = DOMAINS.get(name, key="partition.transforms")
    return transform(x, strength, numpy_rng(seed, "domain", cid, "draws"))


@DOMAINS.register("rotate")
def rotate(x: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate every image by ``90 * strength`` degrees about its centre (bilinear, edges
    extended)."""
    h, w = x.shape[-2:]
    angle = math.radians(90.0 * strength)
    cos, sin = math.cos(angle), math.sin(angle)
    # pixel centres relative to the image centre, (h, 1) and (1, w): broadcast, not a grid
    yy = (np.arange(h) - (h - 1) / 2)[:, None]
    xx = (np.arange(w) - (w - 1) / 2)[None, :]
    src_y = np.clip(cos * yy - sin * xx + (h - 1) / 2, 0, h - 1)
    src_x = np.clip(sin * yy + cos * xx + (w - 1) / 2, 0, w - 1)
    y0 = np.minimum(np.floor(src_y).astype(np.int64), h - 2)
    x0 = np.minimum(np.floor(src_x).astype(np.int64), w - 2)
    wy = (src_y - y0).astype(np.float32)
    wx = (src_x - x0).astype(np.float32)
    # the four neighbours of every output pixel in one gather from the flattened images
    corner = y0 * w + x0
    near = np.reshape(x, (*x.shape[:-2], h * w))[..., np.stack(
        [corner, corner + 1, corner + w, corner + w + 1])]
    top = near[..., 0, :, :] * (1 - wx) + near[..., 1, :, :] * wx
    bottom = near[..., 2, :, :] * (1 - wx) + near[..., 3, :, :] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


@DOMAINS.register("contrast")
def contrast(x: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Scale each image's deviations from its own mean by ``1 - 0.75 * strength``."""
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return (mean + np.float32(1.0 - 0.75 * strength) * (x - mean)).astype(np.float32)


@DOMAINS.register("noise")
def noise(x: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Add gaussian noise of std ``strength`` (drawn from the client's own generator)."""
    return (x + np.float32(strength) * rng.standard_normal(x.shape, dtype=np.float32)).astype(
        np.float32
    )


@DOMAINS.register("invert")
def invert(x: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Negate the standardized pixels, i.e. mirror intensities about the training mean
    (dark-on-light becomes light-on-dark); the strength is not used."""
    return np.negative(x, dtype=np.float32)


@DOMAINS.register("blur")
def blur(x: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur with std ``1.5 * strength`` pixels (separable, edges extended)."""
    sigma = 1.5 * strength
    radius = max(1, math.ceil(2 * sigma))
    taps = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
    taps = (taps / taps.sum()).astype(np.float32)
    h, w = x.shape[-2:]
    pad = ((0, 0),) * (x.ndim - 2)
    rows = np.pad(x, (*pad, (radius, radius), (0, 0)), mode="edge")
    out = sum(t * rows[..., i:i + h, :] for i, t in enumerate(taps))
    cols = np.pad(out, (*pad, (0, 0), (radius, radius)), mode="edge")
    return sum(t * cols[..., :, i:i + w] for i, t in enumerate(taps)).astype(np.float32)
