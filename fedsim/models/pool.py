"""Max pooling with PyTorch's faster CPU kernel and exactly ``nn.MaxPool2d``'s results.

PyTorch's CPU ``max_pool2d`` is several times slower in the default (NCHW) layout than in
channels-last: 16.7 vs 6.1 ms (conversions included) on a vectorized cohort's
1600×16×8×8 maps, 0.31 vs 0.10 ms on a quickstart batch. Both kernels scan each window in
the same order and pick the same element, so pooling in channels-last and converting back
gives the same values *and* the same indices; the backward pass scatters the gradient with
those indices in the default layout, as ``nn.MaxPool2d``'s own backward does. Results are
bitwise equal (tests/models/test_pool.py), in plain autograd, under ``torch.func``
(``vmap(grad(...))``, the vectorized cohorts) and in double backward (gradient inversion).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedsim.models.batched import BackwardOp, place, under_vmap


class _ChannelsLastMaxPool(torch.autograd.Function):
    """Non-overlapping ``k``×``k`` max pooling of a 4-D CPU tensor: (values, indices)."""

    @staticmethod
    def forward(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        y, idx = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), k, k,
                              return_indices=True)
        return y.contiguous(), idx.contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, k = inputs
        ctx.save_for_backward(x, output[1])
        ctx.k = k
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_idx: Tensor) -> tuple[Tensor, None]:
        x, idx = ctx.saved_tensors
        if under_vmap():  # a vectorized cohort: fold clients into the batch, as forward does
            return _MaxPoolBackward.apply(grad_y, x, idx, ctx.k), None
        # the op nn.MaxPool2d's backward runs (differentiable again: double backward works)
        return _max_pool_backward(grad_y, x, idx, ctx.k), None

    @staticmethod
    def vmap(info, in_dims, x: Tensor, k: int):
        """Under ``torch.func.vmap``: fold the vmapped dimension into the batch."""
        if in_dims[0] is None:
            return _ChannelsLastMaxPool.apply(x, k), (None, None)
        n, side = info.batch_size, _batch_side(in_dims[0])
        y, idx = _ChannelsLastMaxPool.apply(_to_batch(x, in_dims[0], n, side), k)
        return (_from_batch(y, n, side), _from_batch(idx, n, side)), (side, side)


def _max_pool_backward(grad_y: Tensor, x: Tensor, idx: Tensor, k: int) -> Tensor:
    return torch.ops.aten.max_pool2d_with_indices_backward(
        grad_y, x, [k, k], [k, k], [0, 0], [1, 1], False, idx)


def _batch_side(bdim: int) -> int:
    """Where to merge a vmapped dimension with the batch: after it (``(N, K, …)``, a view of
    the layout conv and batch-norm rules leave) or before it (``(K, N, …)``)."""
    return 1 if bdim == 1 else 0


def _to_batch(t: Tensor, bdim: int | None, k: int, side: int) -> Tensor:
    """``t`` (vmapped at ``bdim``) as ``(N·K, …)`` (``side`` 1) or ``(K·N, …)`` (``side`` 0)."""
    return place(t, bdim, k, side).flatten(0, 1)


def _from_batch(t: Tensor, k: int, side: int) -> Tensor:
    """Inverse of :func:`_to_batch`: ``(N, K, …)`` (``side`` 1) or ``(K, N, …)``; a view."""
    return t.unflatten(0, (-1, k) if side == 1 else (k, -1))


class _MaxPoolBackward(BackwardOp):
    """``max_pool2d_with_indices_backward`` whose vmap rule folds clients into the batch."""

    @staticmethod
    def forward(grad_y: Tensor, x: Tensor, idx: Tensor, k: int) -> Tensor:
        return _max_pool_backward(grad_y, x, idx, k)

    @staticmethod
    def vmap(info, in_dims, grad_y: Tensor, x: Tensor, idx: Tensor, k: int):
        n = info.batch_size
        side = _batch_side(in_dims[1] if in_dims[1] is not None else in_dims[0])
        grad_x = _MaxPoolBackward.apply(*(_to_batch(t, d, n, side) for t, d in
                                          zip((grad_y, x, idx), in_dims[:3])), k)
        return _from_batch(grad_x, n, side), side


class FastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, state and results) that pools non-overlapping
    windows of 4-D CPU tensors through the channels-last kernel; other settings, devices
    and shapes run ``nn.MaxPool2d`` itself."""

    def forward(self, x: Tensor) -> Tensor:
        k = self.kernel_size
        if (x.dim() == 4 and x.device.type == "cpu" and isinstance(k, int)
                and self.stride == k and self.padding == 0 and self.dilation == 1
                and not self.ceil_mode and not self.return_indices):
            return _ChannelsLastMaxPool.apply(x, k)[0]
        return super().forward(x)
