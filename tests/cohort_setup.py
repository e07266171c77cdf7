"""A small seeded model for cohort tests and the start arrays its clients share."""

import torch

from fedsim.models import build_model


def seeded_model(arch: str, norm: str, image_size: int = 8):
    """``(model, params, buffers)``: a width-8 ``arch`` with ``norm`` for 1×``image_size``²
    inputs and 10 classes, built from torch seed 0, and detached copies of its parameters
    and buffers (every cohort member's start)."""
    torch.manual_seed(0)
    model = build_model(arch, norm, in_channels=1, image_size=image_size, num_classes=10,
                        width=8, groups=4)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    return model, params, buffers
