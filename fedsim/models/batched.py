"""Folded layers for vectorized cohorts: ``vmap``'s dimension merged into channels or batch.

A vectorized cohort (``engine.vectorize``) runs the model under ``vmap`` and differentiates
the clients' summed losses with ordinary autograd, so ``vmap`` is the innermost (here the
only) transform while the model runs. There a layer can take its input's physical tensor
(all clients stacked), run PyTorch's ordinary ops on it, and hand the result back to
``vmap``; autograd (or an outer ``torch.func.grad``) records those ops, so the backward pass
is their native backward on the stacked tensors too.

- Batch norm of K clients' ``(N, C, ...)`` batches is batch norm of one ``(N, K·C, ...)``
  batch with K·C channels: per-client statistics and per-client running buffers (views of
  the stacked buffers, updated in place).
- Group norm with G groups is group norm over K·C channels in K·G groups (layer norm:
  G = 1, instance norm: G = C).
- Non-overlapping max pooling of K clients is pooling of one ``(K·N, ...)`` batch
  (``fedsim.models.pool``).
- Causal attention of K clients is attention of one ``(K·B, H, T, D)`` batch (it has no
  parameters; ``vmap`` has no batching rule for the CPU kernel and would loop).
- An LSTM layer (``aten::lstm`` has no batching rule: a plain ``vmap`` of it fails) runs
  each client's weights through the fused kernel in turn (the sequential computation, K
  times; under other transforms, its recurrence step by step in ordinary ops).

``vmap``'s own rules compute the same values; the folds make a small CNN's cohort faster
(benchmarks/RESULTS.md, "Norm layers folded
into channels"). The choice is made once, when the cohort's model is built:
:func:`fold_for_cohort` returns a copy of a model whose fedsim layers are replaced by their
folding variants (:data:`FOLDED`); the ordinary layers never look at functorch. A folding
layer still runs ``torch.nn``'s computation wherever it is not under a folding ``vmap``
(eager, ``vmap(grad(...))``, other transforms). functorch's internals are reached through
:mod:`fedsim.compat` only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedsim.compat import (
    add_batch_dim,
    folding_vmap,
    is_batched,
    lstm_layer,
    under_vmap,
    unwrap_batched,
)
from fedsim.models.norm import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, check_features
from fedsim.models.pool import FastMaxPool2d, pool_indices, pools_fast
from fedsim.models.sequence import CausalAttention, LSTMLayer


def physical(t: Tensor, level: int, k: int, dim: int) -> Tensor:
    """``t``'s stacked tensor with the clients' dimension (size ``k``) at ``dim``; a tensor
    not batched at ``level`` (shared by all clients) is expanded, as a view."""
    if is_batched(t, level):
        stacked, bdim = unwrap_batched(t, level)
        return stacked.movedim(bdim, dim)
    return t.unsqueeze(dim).expand(*t.shape[:dim], k, *t.shape[dim:])


def cohort(level: int, *tensors: Tensor) -> int | None:
    """The size of ``vmap``'s dimension at ``level`` (from the first of ``tensors`` that
    carries it), or None when none does."""
    for t in tensors:
        if is_batched(t, level):
            stacked, bdim = unwrap_batched(t, level)
            return stacked.shape[bdim]
    return None


def batch_norm_train(vm, x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor,
                     running_var: Tensor, momentum: float, eps: float) -> Tensor:
    """Training-mode ``F.batch_norm`` of every client at once, folded into channels; each
    client's running buffers are updated in place. ``vm``: the :func:`folding_vmap`."""
    level = vm.level()
    if cohort(level, x, weight, bias, running_mean, running_var) is None:
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if not is_batched(t, level):
            raise RuntimeError(
                f"BatchNorm under vmap trains with batched input but an unbatched {name}: "
                "each vmapped element needs its own running statistics. Pass stacked "
                "buffers (functional_call with a vmapped buffer dict), or use eval mode")
    F._verify_batch_size(x.size())  # F.batch_norm's "more than 1 value per channel" check
    k = cohort(level, running_mean)
    with vm.lower():
        stats = [physical(t, level, k, 0) for t in (running_mean, running_var)]
        flat = [s.reshape(-1) if s.is_contiguous() else s.contiguous().view(-1)
                for s in stats]  # views of contiguous stacks, copies of strided ones
        y = F.batch_norm(physical(x, level, k, 1).flatten(1, 2), flat[0], flat[1],
                         physical(weight, level, k, 0).reshape(-1),
                         physical(bias, level, k, 0).reshape(-1), True, momentum, eps)
        for s, f in zip(stats, flat):
            if not s.is_contiguous():  # a strided buffer was copied: write it back
                s.copy_(f.view_as(s))
        y = y.unflatten(1, (k, -1))
    return add_batch_dim(y, 1, level)


def group_norm(vm, x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``F.group_norm`` of every client at once: K·C channels in K·``groups`` groups.
    ``vm``: the :func:`folding_vmap`."""
    level = vm.level()
    k = cohort(level, x, weight, bias)
    if k is None:  # nothing here varies by client
        return F.group_norm(x, groups, weight, bias, eps)
    with vm.lower():
        y = F.group_norm(physical(x, level, k, 1).flatten(1, 2), k * groups,
                         physical(weight, level, k, 0).reshape(-1),
                         physical(bias, level, k, 0).reshape(-1), eps)
        y = y.unflatten(1, (k, -1))
    return add_batch_dim(y, 1, level)


def max_pool(vm, x: Tensor, k: int) -> Tensor:
    """Non-overlapping ``k``×``k`` max pooling of every client at once (``x`` batched at
    ``vm``'s level): the clients fold into the batch next to where ``vmap`` keeps them, the
    channels-last kernel finds each window's maximum, and a gather takes it, so the gradient
    goes to the same element as ``nn.MaxPool2d``'s (ordinary ops: ``grad`` records them)."""
    level = vm.level()
    stacked, bdim = unwrap_batched(x, level)
    side = 1 if bdim == 1 else 0  # (N, K, ...) is the layout conv and BN rules leave
    n = stacked.shape[bdim]
    with vm.lower():
        flat = stacked.movedim(bdim, side).flatten(0, 1)
        idx = pool_indices(flat.detach(), k)
        y = flat.flatten(2).gather(2, idx.flatten(2)).view_as(idx)
        y = y.unflatten(0, (-1, n) if side == 1 else (n, -1))
    return add_batch_dim(y, side, level)


# --------------------------------------------------------------------------- folding layers


class FoldedBatchNorm(BatchNorm):
    """:class:`~fedsim.models.norm.BatchNorm` that trains a folding ``vmap`` cohort as one
    batch norm over K·C channels (per-client statistics and running buffers)."""

    def forward(self, x: Tensor) -> Tensor:
        if (self.training and self.momentum is not None and self.running_mean is not None
                and self.weight is not None and (vm := folding_vmap()) is not None):
            self._check_input_dim(x)
            self.num_batches_tracked.add_(1)
            return batch_norm_train(vm, x, self.weight, self.bias, self.running_mean,
                                    self.running_var, self.momentum, self.eps)
        return super().forward(x)


class FoldedGroupNorm(GroupNorm):
    """:class:`~fedsim.models.norm.GroupNorm` that runs a folding ``vmap`` cohort as one group
    norm over K·C channels in K·G groups."""

    def forward(self, x: Tensor) -> Tensor:
        if (vm := folding_vmap()) is not None:
            self._check_groups(x)
            return group_norm(vm, x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


class FoldedLayerNorm(LayerNorm):
    """:class:`~fedsim.models.norm.LayerNorm` folded as group norm with one group per client."""

    def forward(self, x: Tensor) -> Tensor:
        if (vm := folding_vmap()) is not None:
            return group_norm(vm, x, 1, self.weight, self.bias, self.eps)
        return super().forward(x)


class FoldedInstanceNorm(InstanceNorm):
    """:class:`~fedsim.models.norm.InstanceNorm` folded as group norm: one group per channel
    on conv features, one per sample on vectors (where instance norm is layer norm)."""

    def forward(self, x: Tensor) -> Tensor:
        if (vm := folding_vmap()) is not None:
            check_features(x, type(self).__name__)
            groups = 1 if x.dim() == 2 else self.num_channels
            return group_norm(vm, x, groups, self.weight, self.bias, self.eps)
        return super().forward(x)


class FoldedMaxPool2d(FastMaxPool2d):
    """:class:`~fedsim.models.pool.FastMaxPool2d` that pools a folding ``vmap`` cohort's
    clients as one batch."""

    def forward(self, x: Tensor) -> Tensor:
        if pools_fast(self, x) and (vm := folding_vmap()) is not None and is_batched(
                x, vm.level()):
            return max_pool(vm, x, self.kernel_size)
        return super().forward(x)


class FoldedCausalAttention(CausalAttention):
    """:class:`~fedsim.models.sequence.CausalAttention` that attends a folding ``vmap``
    cohort's clients as one batch of ``K·B`` sequences."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        vm = folding_vmap()
        n = None if vm is None else cohort(vm.level(), q, k, v)
        if n is None:
            return super().forward(q, k, v)
        level = vm.level()
        with vm.lower():
            q, k, v = (physical(t, level, n, 0).flatten(0, 1) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).unflatten(0, (n, -1))
        return add_batch_dim(y, 0, level)


class FoldedLSTMLayer(LSTMLayer):
    """:class:`~fedsim.models.sequence.LSTMLayer` that runs under ``vmap``, where
    ``aten::lstm`` has no batching rule (a plain ``vmap`` of it fails).

    Under a folding ``vmap`` (a cohort) each client's weights go through the fused kernel
    ``nn.LSTM`` runs (:func:`fedsim.compat.lstm_layer`), one client after the other on the
    stacked tensors: the sequential backend's computation, K times. Under any other ``vmap``
    the recurrence runs step by step in ordinary ops, which ``vmap`` batches: ``nn.LSTM``'s
    equations, gates in its order i, f, g, o: ``i, f, o = σ(·)``, ``g = tanh(·)``,
    ``c' = f·c + i·g``, ``h' = o·tanh(c')`` (about 3x slower on a CPU than the fused kernel).
    """

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if not under_vmap():
            return super().forward(x)
        weights = (self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0)
        vm = folding_vmap()
        k = None if vm is None else cohort(vm.level(), x, *weights)
        if k is not None:
            level = vm.level()
            with vm.lower():
                xs, *ws = (physical(t, level, k, 0) for t in (x, *weights))
                y = torch.stack([lstm_layer(xs[i], *(w[i] for w in ws), train=self.training)
                                 for i in range(k)])
            return add_batch_dim(y, 0, level)
        return self._unrolled(x, *weights)

    def _unrolled(self, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
                  b_hh: Tensor) -> Tensor:
        b, t, _ = x.shape
        gates_x = F.linear(x, w_ih, b_ih)  # every step's input part at once
        h = c = x.new_zeros((b, self.hidden_size), dtype=gates_x.dtype)
        out = []
        for step in range(t):
            gates = gates_x[:, step] + F.linear(h, w_hh, b_hh)
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            out.append(h)
        return torch.stack(out, dim=1)


#: layer type → its folding variant: a subclass that changes ``forward`` only (same
#: constructor, parameters, buffers and settings), so a layer is folded by changing its class
FOLDED: dict[type[nn.Module], type[nn.Module]] = {}


def register_fold(plain: type[nn.Module], folded: type[nn.Module]) -> None:
    """Let :func:`fold_for_cohort` replace layers of exactly type ``plain`` by ``folded``."""
    if not (isinstance(folded, type) and issubclass(folded, plain)):
        raise TypeError(f"error: the folding variant of {plain.__name__} must subclass it, "
                        f"got {folded!r}")
    if folded.__init__ is not plain.__init__ or "__slots__" in vars(folded):
        raise TypeError(f"error: {folded.__name__} may override forward only, so that a "
                        f"{plain.__name__}'s state is already the folded layer's state")
    FOLDED[plain] = folded


for _plain, _folded in ((BatchNorm, FoldedBatchNorm), (GroupNorm, FoldedGroupNorm),
                        (LayerNorm, FoldedLayerNorm), (InstanceNorm, FoldedInstanceNorm),
                        (FastMaxPool2d, FoldedMaxPool2d), (CausalAttention, FoldedCausalAttention),
                        (LSTMLayer, FoldedLSTMLayer)):
    register_fold(_plain, _folded)
del _plain, _folded


def fold_for_cohort(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for running a cohort under ``vmap``: every layer whose exact type
    has a folding variant (:data:`FOLDED`) becomes one, everything else is a deep copy.

    The copy has the same parameter and buffer names, settings (eps, momentum, groups, mode)
    and values, and shares no tensor with ``model``. Its folding layers compute what the
    plain ones do (within float rounding) and take the fast path only where ``vmap`` is the
    innermost transform; a subclass of a plain layer is left as it is (its ``forward`` may
    differ). Folding a folded model changes nothing.
    """
    folded = copy.deepcopy(model)
    for module in folded.modules():
        variant = FOLDED.get(type(module))
        if variant is not None:
            module.__class__ = variant  # a subclass adding no state: only forward changes
    return folded


__all__ = [
    "FOLDED",
    "FoldedBatchNorm",
    "FoldedCausalAttention",
    "FoldedGroupNorm",
    "FoldedInstanceNorm",
    "FoldedLSTMLayer",
    "FoldedLayerNorm",
    "FoldedMaxPool2d",
    "fold_for_cohort",
    "folding_vmap",
    "register_fold",
]
