"""Models: small image classifiers (``nets``), next-character models (``sequence``) and the
norm-layer factory they share (``norm``)."""

import fedsim.models.sequence  # noqa: F401  (registers "lstm" and "transformer" in ARCHS)
from fedsim.models.nets import ARCHS, build_model, input_kind
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
    "input_kind",
    "make_norm",
    "norm_modules",
    "uses_batch_statistics",
]
