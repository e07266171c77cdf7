"""Pick the torch device for a run: CUDA when present, CPU otherwise, unless overridden."""

from __future__ import annotations

import torch

from fedsim.errors import ScenarioError


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` if available else ``cpu``; explicit CUDA must be available.

    On CUDA, cuDNN is asked for deterministic algorithms (no autotuning), so a seed gives
    the same run twice on the same GPU and ``--resume`` stays exact there.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ScenarioError(
            f"engine.device = {name!r} but CUDA is not available here; use 'auto' or 'cpu'"
        )
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return device
