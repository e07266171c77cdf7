"""Batching rules that fold ``vmap``'s dimension into channels, for vectorized cohorts.

A vectorized cohort (``engine.vectorize``) runs every client's forward and backward pass
under ``torch.func.vmap``. For norm layers, ``vmap``'s own rules normalise with the native
kernel but compute the backward pass (and the affine part) from elementwise ops on the
stacked activations: ~29% of a small-CNN cohort's kernel time for batch norm. Batch norm
of K clients' ``(N, C, ...)`` batches is batch norm of one ``(N, K·C, ...)`` batch with
K·C channels, and group norm with G groups is group norm over K·C channels with K·G groups
(layer norm: G = 1, instance norm: G = C). So here both passes fold the clients into
channels and run PyTorch's native kernels once (exactly per-client statistics; per-client
running buffers updated in place). The norm layers in :mod:`fedsim.models.norm` use these
under ``vmap`` only; everywhere else they run ``torch.nn``'s own code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._functorch.pyfunctorch import TransformType, retrieve_all_functorch_interpreters


def under_vmap() -> bool:
    """True inside ``torch.func.vmap`` with at most one ``grad`` level and no other transform
    (``vmap(grad(f))``, the cohort's case): where the folded rules below apply."""
    keys = [i.key() for i in retrieve_all_functorch_interpreters()]
    return (TransformType.Vmap in keys and keys.count(TransformType.Grad) <= 1
            and all(k in (TransformType.Vmap, TransformType.Grad) for k in keys))


#: per-client elements below which a norm layer keeps vmap's own rule: each folded call
#: costs ~1 ms of Python in functorch's autograd.Function machinery (fwd + bwd), which
#: only large activations repay (a 100-client cohort: CNN features of 8-16K elements per
#: client gain ~9 ms per layer and step; an MLP's 128 lose ~1.3 ms)
FOLD_MIN_NUMEL = 4096


def fold_norm(x: Tensor) -> bool:
    """Whether a norm layer should take its folded rule for (logical, per-client) ``x``."""
    return x.numel() >= FOLD_MIN_NUMEL and under_vmap()


def place(t: Tensor, bdim: int | None, k: int, dim: int) -> Tensor:
    """Physical ``t`` with its vmapped dimension (size ``k``, at ``bdim``; None: unbatched,
    repeated ``k`` times) moved to ``dim``; a view."""
    if bdim is None:
        return t.unsqueeze(dim).expand(*t.shape[:dim], k, *t.shape[dim:])
    return t.movedim(bdim, dim)


def fold(t: Tensor, bdim: int | None, k: int, dim: int) -> Tensor:
    """``t``'s vmapped dimension merged into logical dimension ``dim`` as its outer factor:
    ``(…, k·d, …)``. A view when the vmapped dimension already sits just before ``dim``."""
    return place(t, bdim, k, dim).flatten(dim, dim + 1)


def unfold(t: Tensor, k: int, dim: int) -> Tensor:
    """Inverse of :func:`fold`: split dimension ``dim`` into ``(k, d)``; a view."""
    return t.unflatten(dim, (k, -1))


class BackwardOp(torch.autograd.Function):
    """Base of the folded rules' backward passes, as ops with their own ``vmap`` rule:
    first order only (a cohort differentiates once; gradient inversion runs outside vmap)."""

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("fedsim's folded vmap rules (norm layers, FastMaxPool2d) have no "
                           "double backward; run higher-order gradients outside vmap")


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm with the native kernels: (output, batch mean, inverse std).
    Updates ``running_mean``/``running_var`` in place, as ``F.batch_norm`` does."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor,
                running_var: Tensor, momentum: float, eps: float
                ) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ops.aten.native_batch_norm(x, weight, bias, running_mean, running_var,
                                                True, momentum, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _bias, _rm, _rv, _momentum, eps = inputs
        ctx.save_for_backward(x, weight, output[1], output[2])
        ctx.eps = eps
        ctx.mark_non_differentiable(output[1], output[2])

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_mean: Tensor, _grad_invstd: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_x, grad_w, grad_b = _BatchNormBackward.apply(grad_y, x, weight, mean, invstd,
                                                          ctx.eps)
        return grad_x, grad_w, grad_b, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, running_mean, running_var, momentum, eps):
        """K clients' batch norm as one over K·C channels; running buffers stay per client."""
        k = info.batch_size
        stats = []
        for name, t, bdim in (("running_mean", running_mean, in_dims[3]),
                              ("running_var", running_var, in_dims[4])):
            if bdim is None:
                raise RuntimeError(
                    f"BatchNorm under vmap trains with batched input but an unbatched {name}: "
                    "each vmapped element needs its own running statistics. Pass stacked "
                    "buffers (functional_call with a vmapped buffer dict), or use eval mode")
            stats.append(t.movedim(bdim, 0))
        flat = [s.reshape(-1) for s in stats]  # views of contiguous stacks
        y, mean, invstd = _BatchNormTrain.apply(
            fold(x, in_dims[0], k, 1), fold(weight, in_dims[1], k, 0),
            fold(bias, in_dims[2], k, 0), flat[0], flat[1], momentum, eps)
        for s, f in zip(stats, flat):
            if f.data_ptr() != s.data_ptr():  # a strided buffer was copied: write it back
                s.copy_(f.view_as(s))
        return (unfold(y, k, 1), unfold(mean, k, 0), unfold(invstd, k, 0)), (1, 0, 0)


class _BatchNormBackward(BackwardOp):
    """The native batch-norm backward: gradients of input, weight and bias."""

    @staticmethod
    def forward(grad_y: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, None, None, mean, invstd, True, eps, [True, True, True])

    @staticmethod
    def vmap(info, in_dims, grad_y, x, weight, mean, invstd, eps):
        k = info.batch_size
        grads = _BatchNormBackward.apply(
            fold(grad_y, in_dims[0], k, 1), fold(x, in_dims[1], k, 1),
            fold(weight, in_dims[2], k, 0), fold(mean, in_dims[3], k, 0),
            fold(invstd, in_dims[4], k, 0), eps)
        return (unfold(grads[0], k, 1), unfold(grads[1], k, 0), unfold(grads[2], k, 0)), \
            (1, 0, 0)


def batch_norm_train(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor,
                     running_var: Tensor, momentum: float, eps: float) -> Tensor:
    """``F.batch_norm(..., training=True)`` whose ``vmap`` rule folds clients into channels."""
    F._verify_batch_size(x.size())  # F.batch_norm's "more than 1 value per channel" check
    return _BatchNormTrain.apply(x, weight, bias, running_mean, running_var, momentum, eps)[0]


class _GroupNorm(torch.autograd.Function):
    """Group norm with the native kernels: (output, per-group mean, per-group 1/std)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float
                ) -> tuple[Tensor, Tensor, Tensor]:
        n, c = x.shape[:2]
        return torch.ops.aten.native_group_norm(x, weight, bias, n, c, x[0, 0].numel(),
                                                groups, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _bias, groups, _eps = inputs
        ctx.save_for_backward(x, weight, output[1], output[2])
        ctx.groups = groups
        ctx.mark_non_differentiable(output[1], output[2])

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_mean: Tensor, _grad_rstd: Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        grad_x, grad_w, grad_b = _GroupNormBackward.apply(grad_y, x, mean, rstd, weight,
                                                          ctx.groups)
        return grad_x, grad_w, grad_b, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, groups, eps):
        """K clients' group norm as one over K·C channels in K·G groups."""
        k = info.batch_size
        y, mean, rstd = _GroupNorm.apply(fold(x, in_dims[0], k, 1),
                                         fold(weight, in_dims[1], k, 0),
                                         fold(bias, in_dims[2], k, 0), k * groups, eps)
        return (unfold(y, k, 1), unfold(mean, k, 1), unfold(rstd, k, 1)), (1, 1, 1)


class _GroupNormBackward(BackwardOp):
    """The native group-norm backward: gradients of input, weight and bias."""

    @staticmethod
    def forward(grad_y: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor,
                groups: int) -> tuple[Tensor, Tensor, Tensor]:
        n, c = x.shape[:2]
        return torch.ops.aten.native_group_norm_backward(
            grad_y, x, mean, rstd, weight, n, c, x[0, 0].numel(), groups, [True, True, True])

    @staticmethod
    def vmap(info, in_dims, grad_y, x, mean, rstd, weight, groups):
        k = info.batch_size
        grads = _GroupNormBackward.apply(
            fold(grad_y, in_dims[0], k, 1), fold(x, in_dims[1], k, 1),
            fold(mean, in_dims[2], k, 1), fold(rstd, in_dims[3], k, 1),
            fold(weight, in_dims[4], k, 0), k * groups)
        return (unfold(grads[0], k, 1), unfold(grads[1], k, 0), unfold(grads[2], k, 0)), \
            (1, 0, 0)


def group_norm(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``F.group_norm`` whose ``vmap`` rule folds clients into channels (K·G groups)."""
    return _GroupNorm.apply(x, weight, bias, groups, eps)[0]
