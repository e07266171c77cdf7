"""Pick the torch device for a run: CUDA when present, CPU otherwise, unless overridden."""

from __future__ import annotations

import torch

from fedsim.errors import ScenarioError


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` if available else ``cpu``; explicit CUDA must be available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ScenarioError(
            f"engine.device = {name!r} but CUDA is not available here; use 'auto' or 'cpu'"
        )
    return torch.device(name)
