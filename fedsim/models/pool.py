"""Max pooling with PyTorch's faster CPU kernel and exactly ``nn.MaxPool2d``'s results.

PyTorch's CPU ``max_pool2d`` is several times slower in the default (NCHW) layout than in
channels-last, conversions included (benchmarks/RESULTS.md, "Profiles"). Both kernels scan
each window in the same order and pick the same element, so pooling in channels-last and
converting back gives the same values *and* the same indices; the backward pass scatters the
gradient with those indices in the default layout, as ``nn.MaxPool2d``'s own backward does.
Results are bitwise equal (tests/models/test_pool.py), in plain autograd and in double backward
(gradient inversion). Under ``vmap`` the layer runs ``nn.MaxPool2d``'s code (the custom
autograd function has no batching rule); the cohort's folding variant, which pools all
clients at once, is :class:`fedsim.models.batched.FoldedMaxPool2d`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedsim.compat import under_vmap


class _ChannelsLastMaxPool(torch.autograd.Function):
    """Non-overlapping ``k``×``k`` max pooling of a 4-D CPU tensor: (values, indices)."""

    @staticmethod
    def forward(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return pool_indices(x, k, with_values=True)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, k = inputs
        ctx.save_for_backward(x, output[1])
        ctx.k = k
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_idx: Tensor) -> tuple[Tensor, None]:
        x, idx = ctx.saved_tensors
        # the op nn.MaxPool2d's backward runs (differentiable again: double backward works)
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad_y, x, [ctx.k, ctx.k], [ctx.k, ctx.k], [0, 0], [1, 1], False, idx), None


def pool_indices(x: Tensor, k: int, with_values: bool = False):
    """The channels-last kernel's (values and) indices, back in ``x``'s layout."""
    y, idx = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), k, k,
                          return_indices=True)
    return (y.contiguous(), idx.contiguous()) if with_values else idx.contiguous()


def pools_fast(layer: nn.MaxPool2d, x: Tensor) -> bool:
    """Whether ``layer`` pools ``x`` through the channels-last kernel: non-overlapping windows
    of a 4-D CPU tensor with default padding, dilation and outputs."""
    k = layer.kernel_size
    return (x.dim() == 4 and x.device.type == "cpu" and isinstance(k, int)
            and layer.stride == k and layer.padding == 0 and layer.dilation == 1
            and not layer.ceil_mode and not layer.return_indices)


class FastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, state and results) that pools non-overlapping
    windows of 4-D CPU tensors through the channels-last kernel; other settings, devices
    and shapes run ``nn.MaxPool2d`` itself."""

    def forward(self, x: Tensor) -> Tensor:
        if pools_fast(self, x) and not under_vmap():
            if not (x.requires_grad and torch.is_grad_enabled()):  # e.g. evaluation
                return pool_indices(x, self.kernel_size, with_values=True)[0]  # no Function
            return _ChannelsLastMaxPool.apply(x, self.kernel_size)[0]
        return super().forward(x)
