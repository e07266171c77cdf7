"""Exact BatchNorm statistics: per-channel moments of a BN layer's input, pooled by the law of
total variance, and evaluation with batch statistics.

FedAvg averages the clients' running variances; the federation's variance is larger by the
spread of the clients' means (law of total variance):

    μ = Σ w_k μ_k,    σ² = Σ w_k σ²_k + Σ w_k (μ_k − μ)²,    w_k = n_k / Σ n_j,

where ``n_k`` counts the values per channel client ``k``'s moments were taken over (samples ×
H × W). Under label skew the second term is what plain averaging misses (Hsieh et al., ICML
2020; FixBN, Zhong et al. 2023). This module computes the pieces every backend uses:

- :func:`bn_layers`: the layers with batch statistics and running statistics (BN, hybrid),
  in the order the forward pass calls them — a layer's input depends on the normalization
  of every layer called before it, so exact statistics are taken layer by layer in this
  order;
- :func:`layer_input`: the input a layer receives, with the forward pass stopped there;
- :func:`chunk_moments` and :func:`pool_moments`: per-channel (count, mean, biased variance)
  of a chunk, per client of a stacked cohort, in float64, and their pooling;
- :func:`input_moments` and :func:`exact_statistics`: one model's moments over its data, and
  its running statistics replaced by them layer by layer (a local "precise BN");
- :func:`set_statistics`: running statistics from moments, in torch's convention (the
  running variance is the unbiased one, as BN's own update stores);
- :func:`batch_statistics`: a train-mode forward of the BN layers that leaves their buffers
  untouched (``model.bn_eval = "batch"``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from fedsim.models.norm import has_running_statistics, layer_uses_batch_statistics

#: samples per forward pass when moments are taken over a client's data
MOMENTS_BATCH = 256

Moments = tuple[Tensor, Tensor, Tensor]  # (count, mean, biased variance), float64


def is_bn_layer(module: nn.Module) -> bool:
    """A layer whose running statistics summarise per-channel moments of its input: it
    normalises training batches with batch statistics and keeps running mean/variance (BN,
    hybrid). InstanceNorm's optional running statistics average per-sample statistics
    instead, so they are not such a layer."""
    return layer_uses_batch_statistics(module) and has_running_statistics(module) and all(
        getattr(module, n, None) is not None for n in ("running_mean", "running_var"))


class _Reached(Exception):
    """Raised by a forward pre-hook to stop a forward pass at a layer, carrying its input."""

    def __init__(self, value: Tensor) -> None:
        super().__init__("layer reached")
        self.value = value


def _stop_here(_module: nn.Module, args: tuple) -> None:
    raise _Reached(args[0])


def layer_input(layer: nn.Module, forward: Callable[[], object]) -> Tensor:
    """The input ``layer`` receives when ``forward()`` runs the model it belongs to; the
    pass stops there (nothing after the layer runs). Works under ``vmap`` too, where the
    input is the batched tensor of the current level."""
    handle = layer.register_forward_pre_hook(_stop_here)
    try:
        forward()
    except _Reached as reached:
        return reached.value
    finally:
        handle.remove()
    raise RuntimeError(f"the forward pass never reached {type(layer).__name__} layer")


def bn_layers(model: nn.Module, inputs: Tensor | Sequence[int]) -> list[tuple[str, nn.Module]]:
    """``model``'s BN layers (:func:`is_bn_layer`) in the order its forward pass calls them,
    found with one eval-mode pass on a batch of two zero inputs shaped and typed like
    ``inputs``: a batch of the model's inputs (integer token ids stay integers; floating
    inputs take the parameters' dtype), or one image's shape without the batch dimension.
    A layer the pass never reaches is left out (nothing could estimate its statistics); a
    layer called twice is an error (its statistics would mix two inputs)."""
    named = {id(m): n for n, m in model.named_modules() if is_bn_layer(m)}
    if not named:
        return []
    order: list[str] = []

    def record(module: nn.Module, _args: tuple) -> None:
        order.append(named[id(module)])

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if id(m) in named]
    ref = next(iter(model.parameters()), None)
    x = (inputs.new_zeros((2, *inputs.shape[1:])) if isinstance(inputs, Tensor)
         else torch.zeros((2, *inputs)))
    if ref is not None:
        x = x.to(device=ref.device, dtype=ref.dtype if x.is_floating_point() else None)
    try:
        with kept_modes(model), torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.eval()
            model(x)
    finally:
        for h in handles:
            h.remove()
    twice = sorted({n for n in order if order.count(n) > 1})
    if twice:
        raise ValueError(f"norm layer(s) {twice} are called more than once per forward pass; "
                         "their running statistics would mix the inputs of several calls")
    modules = dict(model.named_modules())
    return [(n, modules[n]) for n in order]


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval mode on exit, whatever the body sets."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


# --------------------------------------------------------------------------- moments


def chunk_moments(x: Tensor, valid: Tensor | None = None) -> Moments:
    """Per-channel (count, mean, biased variance) of a stacked chunk ``x`` of shape
    ``(k, n, C, *spatial)``, one set per row ``k`` (a client), over its samples and spatial
    positions; ``valid`` (``(k, n)`` bool) leaves padded samples out. Shapes ``(k,)``,
    ``(k, C)``, ``(k, C)``, float64; a row without values has count 0, mean 0, variance 0.

    Two passes (the mean, then the squared deviations from it), summed in float64. The
    deviations are taken in ``x``'s dtype: float64 input is float64 throughout (exact to
    float64 rounding); for float32 activations the variance then carries a relative error
    of ~1e-8, below the float32 the running statistics are stored in, at a quarter of the
    time a float64 copy of the chunk costs."""
    k, n, c = x.shape[:3]
    spatial = math.prod(x.shape[3:])
    # channels first: each row's and channel's values along the last two dimensions (a view
    # for the (N, C, H, W) layouts of conv and linear activations)
    x = x.transpose(1, 2).reshape(k, c, n, spatial)
    if valid is None:
        count = torch.full((k,), float(n * spatial), dtype=torch.float64, device=x.device)
        w = None
    else:
        count = valid.to(torch.float64).sum(1) * spatial
        w = valid.to(x.dtype)[:, None, :, None]  # (k, 1, n, 1)
    safe = count.clamp(min=1.0)[:, None]
    mean = (x if w is None else x * w).sum(dim=(2, 3), dtype=torch.float64) / safe
    dev = x - mean.to(x.dtype)[:, :, None, None]
    if w is not None:
        dev = dev * w
    var = dev.square().sum(dim=(2, 3), dtype=torch.float64) / safe
    return count, mean, var


def segment_moments(x: Tensor, segment: Tensor, k: int) -> Moments:
    """:func:`chunk_moments` of a chunk of concatenated clients: ``x`` ``(n, C, *spatial)``
    whose sample ``i`` belongs to client ``segment[i]`` (in ``0..k-1``); per-client
    (count, mean, biased variance), shapes ``(k,)``, ``(k, C)``, ``(k, C)``, float64, with
    the same two passes and precision."""
    n, c = x.shape[:2]
    spatial = math.prod(x.shape[2:])
    x = x.reshape(n, c, spatial)
    count = torch.bincount(segment, minlength=k).to(torch.float64) * spatial
    safe = count.clamp(min=1.0)[:, None]
    zeros = torch.zeros((k, c), dtype=torch.float64, device=x.device)
    mean = zeros.index_add(0, segment, x.sum(dim=2, dtype=torch.float64)) / safe
    dev = x - mean.to(x.dtype)[segment][:, :, None]
    var = zeros.index_add(0, segment, dev.square().sum(dim=2, dtype=torch.float64)) / safe
    return count, mean, var


def pool_moments(counts: Tensor, means: Tensor, variances: Tensor) -> Moments:
    """The law of total variance over parts along dim 0: ``counts`` ``(P, ...)``, ``means``
    and ``variances`` (biased) ``(P, ..., C)`` → the pooled (N, μ, σ²) with

        N = Σ n_p,   μ = Σ (n_p/N) μ_p,   σ² = Σ (n_p/N) σ²_p + Σ (n_p/N) (μ_p − μ)².

    Parts of count 0 weigh nothing; where every part is empty the result is (0, 0, 0).
    In float64."""
    counts, means, variances = counts.double(), means.double(), variances.double()
    total = counts.sum(0)
    w = (counts / total.clamp(min=1.0)).unsqueeze(-1)  # (P, ..., 1)
    mean = (w * means).sum(0)
    var = (w * variances).sum(0) + (w * (means - mean).square()).sum(0)
    return total, mean, var


def accumulate(acc: Moments | None, part: Moments) -> Moments:
    """``acc`` and ``part`` (per-row moments) pooled row by row (:func:`pool_moments`)."""
    if acc is None:
        return part
    return pool_moments(*(torch.stack([a, b]) for a, b in zip(acc, part)))


def parts(n: int, size: int = MOMENTS_BATCH) -> list[slice]:
    """``n`` samples in consecutive slices of at most ``size`` (at least one slice)."""
    return [slice(s, min(n, s + size)) for s in range(0, n, size)] or [slice(0, 0)]


@torch.no_grad()
def input_moments(model: nn.Module, layer: nn.Module, x: Tensor,
                  batch_size: int = MOMENTS_BATCH) -> Moments:
    """Per-channel (count, mean, biased variance) of ``layer``'s input over every sample of
    ``x``, with ``model`` in eval mode (each sample independent of the others): scalars
    count and ``(C,)`` mean and variance, float64. The mode is restored after."""
    acc: Moments | None = None
    with kept_modes(model):
        model.eval()
        for part in parts(len(x), batch_size):
            xb = x[part]
            if len(xb) == 0:
                continue
            h = layer_input(layer, lambda xb=xb: model(xb))
            acc = accumulate(acc, chunk_moments(h.unsqueeze(0)))
    if acc is None:
        c = layer.running_mean.numel()
        zero = torch.zeros(c, dtype=torch.float64)
        return torch.zeros((), dtype=torch.float64), zero, zero.clone()
    return acc[0][0], acc[1][0], acc[2][0]


def unbiased(count: Tensor, var: Tensor) -> Tensor:
    """The running variance torch's BN stores for a biased variance over ``count`` values:
    ``var · n/(n − 1)``; a single value (or none) has variance 0."""
    n = count.double()
    factor = torch.where(n > 1, n / (n - 1).clamp(min=1.0), torch.zeros_like(n))
    return var * (factor.unsqueeze(-1) if var.dim() > factor.dim() else factor)


def biased(count: Tensor, running_var: Tensor) -> Tensor:
    """The biased variance behind a running variance stored by :func:`unbiased`."""
    n = count.double()
    factor = torch.where(n > 1, (n - 1) / n.clamp(min=1.0), torch.zeros_like(n))
    return running_var.double() * (factor.unsqueeze(-1) if running_var.dim() > factor.dim()
                                   else factor)


@torch.no_grad()
def set_statistics(layer: nn.Module, count: Tensor, mean: Tensor, var: Tensor) -> None:
    """``layer``'s running mean and variance from moments over ``count`` values (biased
    ``var``; stored unbiased, as BN's own update would store them for one batch of all the
    values). ``num_batches_tracked`` is left alone."""
    layer.running_mean.copy_(mean)
    layer.running_var.copy_(unbiased(count, var))


@torch.no_grad()
def exact_statistics(model: nn.Module, x: Tensor, layers: Sequence[tuple[str, nn.Module]],
                     batch_size: int = MOMENTS_BATCH) -> dict[str, int]:
    """Replace the running statistics of ``layers`` (in call order, :func:`bn_layers`) by the
    exact moments of their inputs over ``x``, layer by layer: each layer's moments are taken
    with every earlier layer already normalising with its new statistics (eval mode). Returns
    each layer's count of values per channel."""
    counts = {}
    for name, layer in layers:
        count, mean, var = input_moments(model, layer, x, batch_size)
        set_statistics(layer, count, mean, var)
        counts[name] = int(count.item())
    return counts


# --------------------------------------------------------------------------- batch statistics


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """``model`` with its batch-statistics layers in train mode — each batch normalised with
    its own statistics — and everything else in eval mode; their buffers (running
    statistics, batch counter) are restored afterwards, so the forward passes change
    nothing (``model.bn_eval = "batch"``)."""
    layers = [m for m in model.modules() if layer_uses_batch_statistics(m)]
    saved = [(m, {n: b.clone() for n, b in m.named_buffers(recurse=False)}) for m in layers]
    with kept_modes(model):
        model.eval()
        for m in layers:
            m.train()
        try:
            yield
        finally:
            with torch.no_grad():
                for m, buffers in saved:
                    for n, b in buffers.items():
                        getattr(m, n).copy_(b)


__all__ = [
    "MOMENTS_BATCH",
    "accumulate",
    "batch_statistics",
    "biased",
    "bn_layers",
    "chunk_moments",
    "exact_statistics",
    "input_moments",
    "is_bn_layer",
    "kept_modes",
    "layer_input",
    "parts",
    "pool_moments",
    "segment_moments",
    "set_statistics",
    "unbiased",
]
