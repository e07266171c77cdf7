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

``vmap``'s own rules compute the same values, but a small CNN's cohort spends 10–28% less
time with these folds for BN, GN and LN (benchmarks/RESULTS.md). Elsewhere (eager,
``vmap(grad(...))``, other transforms) the layers run ``torch.nn``'s code.
"""

from __future__ import annotations

import torch._C._functorch as functorch_c
import torch.nn.functional as F
from torch import Tensor
from torch._functorch.pyfunctorch import TransformType, retrieve_all_functorch_interpreters


def folding_vmap():
    """The ``vmap`` interpreter when ``vmap`` is the innermost transform and every other is
    ``vmap`` or ``grad`` (a bare ``vmap``, the cohort's case, or ``grad(vmap(f))``), else
    None: where the folded layers below apply."""
    interpreters = retrieve_all_functorch_interpreters()
    if not interpreters or interpreters[-1].key() != TransformType.Vmap:
        return None
    if any(i.key() not in (TransformType.Vmap, TransformType.Grad) for i in interpreters):
        return None
    return interpreters[-1]


def under_vmap() -> bool:
    """Whether ``torch.func.vmap`` is active at any level."""
    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def physical(t: Tensor, level: int, k: int, dim: int) -> Tensor:
    """``t``'s stacked tensor with the clients' dimension (size ``k``) at ``dim``; a tensor
    not batched at ``level`` (shared by all clients) is expanded, as a view."""
    if functorch_c.is_batchedtensor(t) and functorch_c.maybe_get_level(t) == level:
        stacked, bdim = functorch_c._unwrap_batched(t, level)
        return stacked.movedim(bdim, dim)
    return t.unsqueeze(dim).expand(*t.shape[:dim], k, *t.shape[dim:])


def is_batched(t: Tensor, level: int) -> bool:
    """Whether ``t`` carries ``vmap``'s dimension at ``level``."""
    return functorch_c.is_batchedtensor(t) and functorch_c.maybe_get_level(t) == level


def cohort(level: int, *tensors: Tensor) -> int | None:
    """The size of ``vmap``'s dimension at ``level`` (from the first of ``tensors`` that
    carries it), or None when none does."""
    for t in tensors:
        if is_batched(t, level):
            stacked, bdim = functorch_c._unwrap_batched(t, level)
            return stacked.shape[bdim]
    return None


def unwrap(t: Tensor, level: int) -> tuple[Tensor, int]:
    """A tensor batched at ``level``: its stacked tensor and where the clients' dim sits."""
    return functorch_c._unwrap_batched(t, level)


def rewrap(t: Tensor, dim: int, level: int) -> Tensor:
    """Stacked ``t`` handed back to ``vmap`` (at ``level``) with the clients' dim at ``dim``."""
    return functorch_c._add_batch_dim(t, dim, level)


def batch_norm_train(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor,
                     running_var: Tensor, momentum: float, eps: float) -> Tensor:
    """Training-mode ``F.batch_norm`` of every client at once, folded into channels; each
    client's running buffers are updated in place. Call where :func:`folding_vmap` is set."""
    vm = folding_vmap()
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
    return rewrap(y, 1, level)


def group_norm(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``F.group_norm`` of every client at once: K·C channels in K·``groups`` groups. Call
    where :func:`folding_vmap` is set."""
    vm = folding_vmap()
    level = vm.level()
    k = cohort(level, x, weight, bias)
    if k is None:  # nothing here varies by client
        return F.group_norm(x, groups, weight, bias, eps)
    with vm.lower():
        y = F.group_norm(physical(x, level, k, 1).flatten(1, 2), k * groups,
                         physical(weight, level, k, 0).reshape(-1),
                         physical(bias, level, k, 0).reshape(-1), eps)
        y = y.unflatten(1, (k, -1))
    return rewrap(y, 1, level)
