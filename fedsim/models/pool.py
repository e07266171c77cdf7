"""Max pooling with PyTorch's faster CPU kernel and exactly ``nn.MaxPool2d``'s results.

PyTorch's CPU ``max_pool2d`` is several times slower in the default (NCHW) layout than in
channels-last: 16.7 vs 6.1 ms (conversions included) on a vectorized cohort's
1600×16×8×8 maps, 0.31 vs 0.10 ms on a quickstart batch. Both kernels scan each window in
the same order and pick the same element, so pooling in channels-last and converting back
gives the same values *and* the same indices; the backward pass scatters the gradient with
those indices in the default layout, as ``nn.MaxPool2d``'s own backward does. Results are
bitwise equal (tests/models/test_pool.py), in plain autograd, in double backward (gradient
inversion) and in vectorized cohorts (``grad(vmap(...))``: all clients pooled at once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedsim.models.batched import folding_vmap, is_batched, rewrap, under_vmap, unwrap


class _ChannelsLastMaxPool(torch.autograd.Function):
    """Non-overlapping ``k``×``k`` max pooling of a 4-D CPU tensor: (values, indices)."""

    @staticmethod
    def forward(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return _pool_indices(x, k, with_values=True)

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


def _pool_indices(x: Tensor, k: int, with_values: bool = False):
    """The channels-last kernel's (values and) indices, back in ``x``'s layout."""
    y, idx = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), k, k,
                          return_indices=True)
    return (y.contiguous(), idx.contiguous()) if with_values else idx.contiguous()


def _folded_max_pool(x: Tensor, k: int) -> Tensor:
    """Every client of a cohort at once (``vmap`` innermost, ``x`` batched there): the
    clients fold into the batch next to where ``vmap`` keeps them, the channels-last kernel
    finds each window's maximum, and a gather takes it, so the gradient goes to the same
    element as ``nn.MaxPool2d``'s (ordinary ops: ``grad`` records them)."""
    vm = folding_vmap()
    level = vm.level()
    stacked, bdim = unwrap(x, level)
    side = 1 if bdim == 1 else 0  # (N, K, ...) is the layout conv and BN rules leave
    n = stacked.shape[bdim]
    with vm.lower():
        flat = stacked.movedim(bdim, side).flatten(0, 1)
        idx = _pool_indices(flat.detach(), k)
        y = flat.flatten(2).gather(2, idx.flatten(2)).view_as(idx)
        y = y.unflatten(0, (-1, n) if side == 1 else (n, -1))
    return rewrap(y, side, level)


class FastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, state and results) that pools non-overlapping
    windows of 4-D CPU tensors through the channels-last kernel; other settings, devices
    and shapes run ``nn.MaxPool2d`` itself."""

    def forward(self, x: Tensor) -> Tensor:
        k = self.kernel_size
        if (x.dim() == 4 and x.device.type == "cpu" and isinstance(k, int)
                and self.stride == k and self.padding == 0 and self.dilation == 1
                and not self.ceil_mode and not self.return_indices):
            vm = folding_vmap()
            if vm is not None and is_batched(x, vm.level()):  # a vectorized cohort
                return _folded_max_pool(x, k)
            if not under_vmap():
                if not (x.requires_grad and torch.is_grad_enabled()):  # e.g. evaluation
                    return _pool_indices(x, k, with_values=True)[0]  # no Function overhead
                return _ChannelsLastMaxPool.apply(x, k)[0]
        return super().forward(x)
