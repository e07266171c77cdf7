"""Models: small image classifiers (``nets``) and the norm-layer factory they share (``norm``)."""

from fedsim.models.nets import ARCHS, build_model
from fedsim.models.norm import (
    NORM_LAYER_TYPES,
    NORMS,
    HybridNorm,
    hybrid_alphas,
    make_norm,
    norm_modules,
    uses_batch_statistics,
)

__all__ = [
    "ARCHS",
    "NORMS",
    "NORM_LAYER_TYPES",
    "HybridNorm",
    "build_model",
    "hybrid_alphas",
    "make_norm",
    "norm_modules",
    "uses_batch_statistics",
]
