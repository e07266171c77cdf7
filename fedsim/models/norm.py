"""Normalization layers: one channels-first factory and the one answer to "is it a norm layer".

Every layer takes vector features ``(N, C)`` and conv features ``(N, C, H, W)``, so model code
calls the factory ``make_norm(kind, C, **options)`` and never branches on the norm type (the
timm ``create_norm`` pattern).

Which layers are norm layers, which normalise with statistics shared across the batch, and
which buffers hold the statistics of the data they saw matters in several places of federated
learning: FedBN keeps norm layers local, FixBN and SiloBN treat their statistics apart, the
vectorized cohort must not pad a batch that BN mixes, and running statistics leak a client's
data. All of them ask the predicates here (:func:`is_norm_layer`,
:func:`layer_uses_batch_statistics`, :func:`statistics_buffers`, :func:`norm_keys`, ...),
which read one table, :data:`NORM_LAYERS`, keyed by layer type (never by name): fedsim's
layers and torch.nn's public ones. A new norm type is one :func:`register_norm_layer` call.

The layers here run torch.nn's computation; the variants that fold a ``vmap`` cohort into one
native kernel call are built once per cohort model by
:func:`fedsim.models.batched.fold_for_cohort`.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedsim.compat import BatchNormBase
from fedsim.registry import Registry

NORMS: Registry[Callable[..., nn.Module]] = Registry("norm")

# --------------------------------------------------------------------------- the norm-layer table

#: buffers of a layer that keeps running statistics as BatchNorm does
RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class NormSpec:
    """What fedsim knows about one norm-layer type.

    ``batch_statistics``: in training the layer normalises each sample with statistics of
    the whole batch (it mixes samples: BN, HybridNorm). ``statistics``: names of its buffers
    that summarise the data it saw (running mean/var and their counter); an instance may
    lack some (``track_running_stats=False``), and only those present count.
    """

    batch_statistics: bool
    statistics: tuple[str, ...] = ()


#: norm-layer type → its spec; a subclass of a listed type is a norm layer of that spec
NORM_LAYERS: dict[type[nn.Module], NormSpec] = {}

M = TypeVar("M", bound=type[nn.Module])


def register_norm_layer(cls: M, *, batch_statistics: bool,
                        statistics: Iterable[str] = ()) -> M:
    """Make ``cls`` (and its subclasses) a norm layer for every predicate of this module:
    FedBN's local keys, FixBN's and SiloBN's statistics, leakage reports, the cohort's
    no-padding rule. Returns ``cls``, so it also works as ``functools.partial`` decorator."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"error: a norm layer type must be an nn.Module subclass, got {cls!r}")
    if not isinstance(batch_statistics, bool):
        raise TypeError(f"error: batch_statistics of {cls.__name__} must be True or False, "
                        f"got {batch_statistics!r}")
    names = tuple(statistics)
    if not all(isinstance(n, str) and n.isidentifier() for n in names):
        raise ValueError(f"error: statistics of {cls.__name__} must be buffer names, got {names}")
    NORM_LAYERS[cls] = NormSpec(batch_statistics, names)
    return cls


def norm_layer(*, batch_statistics: bool, statistics: Iterable[str] = ()) -> Callable[[M], M]:
    """Class decorator form of :func:`register_norm_layer`."""
    return functools.partial(register_norm_layer, batch_statistics=batch_statistics,
                             statistics=tuple(statistics))


def norm_spec(module: nn.Module | type[nn.Module]) -> NormSpec | None:
    """The spec of ``module``'s type (its nearest registered base class), or None."""
    cls = module if isinstance(module, type) else type(module)
    return next((NORM_LAYERS[c] for c in cls.__mro__ if c in NORM_LAYERS), None)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (by type, see :data:`NORM_LAYERS`)."""
    return norm_spec(module) is not None


def layer_uses_batch_statistics(module: nn.Module) -> bool:
    """Whether ``module`` normalises training batches with statistics shared across the batch
    (so a sample's output depends on the others in its batch)."""
    spec = norm_spec(module)
    return spec is not None and spec.batch_statistics


def model_uses_batch_statistics(model: nn.Module) -> bool:
    """Whether any layer of ``model`` mixes the samples of a batch (BN, HybridNorm)."""
    return any(layer_uses_batch_statistics(m) for m in model.modules())


def statistics_buffers(module: nn.Module) -> list[str]:
    """Names of ``module``'s own buffers that hold statistics of the data it saw (empty for
    anything but a norm layer with running statistics)."""
    spec = norm_spec(module)
    if spec is None:
        return []
    own = dict(module.named_buffers(recurse=False))  # None buffers are not listed
    return [name for name in spec.statistics if name in own]


def has_running_statistics(module: nn.Module) -> bool:
    """Whether ``module`` is a norm layer whose buffers summarise the data it saw."""
    return bool(statistics_buffers(module))


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The named normalization layers of ``model`` in module order, selected by type."""
    index = _index_of(model)
    if index is not None:
        return list(index.layers)
    return _find_norm_layers(model)


def _find_norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if is_norm_layer(m)]


def _qualified(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def norm_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every normalization layer: its parameters and buffers (what FedBN
    keeps on the client)."""
    index = _index_of(model)
    if index is not None:
        return list(index.keys)
    return _norm_keys(_find_norm_layers(model))


def _norm_keys(layers: Iterable[tuple[str, nn.Module]]) -> list[str]:
    return [_qualified(name, k) for name, m in layers
            for k in m.state_dict(keep_vars=True)]  # keep_vars: keys only, no detach


def norm_statistics_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the normalization layers' statistics buffers (running mean/var and
    the batch counter: what FixBN freezes and SiloBN keeps local)."""
    index = _index_of(model)
    if index is not None:
        return list(index.statistics_keys)
    return _statistics_keys(_find_norm_layers(model))


def _statistics_keys(layers: Iterable[tuple[str, nn.Module]]) -> list[str]:
    return [_qualified(name, k) for name, m in layers for k in statistics_buffers(m)]


@dataclass(frozen=True)
class NormIndex:
    """What the predicates above answer for one model, computed once: its norm layers, their
    state-dict keys and their statistics keys (:func:`index_norm_layers`)."""

    model_id: int  # the model it describes (a deep copy is another model and reads its own)
    layers: tuple[tuple[str, nn.Module], ...]
    keys: tuple[str, ...]
    statistics_keys: tuple[str, ...]


_INDEX_ATTR = "_fedsim_norm_index"


def index_norm_layers(model: nn.Module) -> NormIndex:
    """Record on ``model`` its :class:`NormIndex`, which :func:`norm_layers`, :func:`norm_keys`
    and :func:`norm_statistics_keys` then return instead of walking the modules again.

    For a model whose module structure and norm layers' parameters and buffers no longer
    change, called by its owner (the client runtime's cohort model, whose hooks ask for its
    norm keys once per client and round). The index lives on the model itself, so it goes
    with it and never outlives it; a deep copy (another model) ignores it.
    """
    layers = tuple(_find_norm_layers(model))
    index = NormIndex(id(model), layers, tuple(_norm_keys(layers)),
                      tuple(_statistics_keys(layers)))
    model.__dict__[_INDEX_ATTR] = index  # not a submodule, parameter or buffer: plain state
    return index


def _index_of(model: nn.Module) -> NormIndex | None:
    index = model.__dict__.get(_INDEX_ATTR)
    return index if index is not None and index.model_id == id(model) else None


def statistics_layers(model: nn.Module, keys: Iterable[str]) -> list[nn.Module]:
    """The norm layers with running statistics that own any of ``keys`` (state-dict keys):
    what re-estimating those keys' statistics must run in train mode."""
    wanted = set(keys)
    return [m for name, m in norm_layers(model)
            if any(_qualified(name, k) in wanted for k in statistics_buffers(m))]


def check_features(x: Tensor, layer: str) -> None:
    """Refuse input that is neither ``(N, C)`` nor ``(N, C, ...)`` features."""
    if x.dim() < 2:
        raise ValueError(f"{layer} expects (N, C) or (N, C, H, W) input, got {tuple(x.shape)}")


@NORMS.register("bn")
@norm_layer(batch_statistics=True, statistics=RUNNING_STATISTICS)
class BatchNorm(BatchNormBase):
    """Batch normalization (Ioffe & Szegedy 2015) for ``(N, C)`` and ``(N, C, H, W)`` input.

    Computes exactly what ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` compute, with the same
    parameter and buffer names. In training, vector features need more than one sample per
    batch (torch raises otherwise); conv features normalise over N·H·W, so batch 1 works.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__(num_channels, eps=eps, momentum=momentum)

    def _check_input_dim(self, input: Tensor) -> None:
        check_features(input, type(self).__name__)


@NORMS.register("in")
@norm_layer(batch_statistics=False)
class InstanceNorm(nn.Module):
    """Instance normalization (Ulyanov et al. 2016) with per-channel affine, no running stats.

    On ``(N, C, H, W)`` each sample and channel is normalised over H·W, as
    ``nn.InstanceNorm2d(C, affine=True)``. Vector features ``(N, C)`` have no spatial extent,
    so there each sample is normalised over its C features (as ``nn.LayerNorm(C)``).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        check_features(x, type(self).__name__)
        if x.dim() == 2:
            return F.layer_norm(x, (self.num_channels,), self.weight, self.bias, self.eps)
        return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


def group_count(num_channels: int, groups: int) -> int:
    """Largest divisor of ``num_channels`` that is <= ``groups`` (at least 1)."""
    if num_channels < 1 or groups < 1:
        raise ValueError(f"need num_channels >= 1 and groups >= 1, got {num_channels}, {groups}")
    return max(g for g in range(1, min(groups, num_channels) + 1) if num_channels % g == 0)


@NORMS.register("gn")
@norm_layer(batch_statistics=False)
class GroupNorm(nn.GroupNorm):
    """Group normalization (Wu & He 2018); ``groups`` is cut to the largest divisor of C.

    Equal to ``nn.GroupNorm(G, C)`` with G the largest divisor of C that is <= ``groups``, so
    any width works with the scenario's single ``groups`` setting. Vector input ``(N, C)``
    with one feature per group is refused: every value would normalise to zero.
    """

    def __init__(self, num_channels: int, groups: int = 8, eps: float = 1e-5) -> None:
        super().__init__(group_count(num_channels, groups), num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        self._check_groups(x)
        return super().forward(x)

    def _check_groups(self, x: Tensor) -> None:
        if x.dim() == 2 and self.num_groups == self.num_channels:
            # each group would hold one value, normalised to 0: the layer would emit its bias
            raise ValueError(
                f"GroupNorm with {self.num_groups} groups of one feature on vector input "
                f"(N, {self.num_channels}) outputs a constant; use fewer groups or more units"
            )


@NORMS.register("ln")
@norm_layer(batch_statistics=False)
class LayerNorm(nn.GroupNorm):
    """Layer normalization (Ba et al. 2016) over (C, H, W) per sample, per-channel affine.

    Equal to ``nn.GroupNorm(1, C)`` on conv features and to ``nn.LayerNorm(C)`` on vectors;
    the affine weight has shape (C,) in both cases, unlike ``nn.LayerNorm([C, H, W])``.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(1, num_channels, eps=eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


@NORMS.register("rms")
@norm_layer(batch_statistics=False)
class RMSNorm(nn.RMSNorm):
    """Root-mean-square normalization (Zhang & Sennrich, NeurIPS 2019): LayerNorm without
    the mean, ``y = x / sqrt(mean(x²) + eps) · weight``, per-channel weight, no bias.

    On vector features ``(N, C)`` it is ``nn.RMSNorm(C)`` (each sample over its C features:
    a transformer's per-token RMSNorm); on conv features ``(N, C, H, W)`` each sample is
    normalised over (C, H, W), as fedsim's :class:`LayerNorm`, with a weight of shape (C,).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(num_channels, eps=eps)
        self.num_channels = num_channels

    def forward(self, x: Tensor) -> Tensor:
        check_features(x, type(self).__name__)
        if x.dim() == 2:
            return F.rms_norm(x, (self.num_channels,), self.weight, self.eps)
        if x.shape[1] != self.num_channels:
            raise ValueError(f"{type(self).__name__}({self.num_channels}) got input with "
                             f"{x.shape[1]} channels, shape {tuple(x.shape)}")
        scale = x.square().mean(dim=tuple(range(1, x.dim())), keepdim=True).add(self.eps)
        shape = (1, self.num_channels) + (1,) * (x.dim() - 2)
        return x * scale.rsqrt() * self.weight.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


@NORMS.register("none")
def no_norm(num_channels: int) -> nn.Module:
    """No normalization: ``nn.Identity`` (the channel count is ignored)."""
    return nn.Identity()


def _var_mean(x: Tensor, dims: list[int], keepdim: bool) -> tuple[Tensor, Tensor]:
    """Biased variance and mean over ``dims`` in two passes (mean, then mean square of the
    deviations): as accurate as ``torch.var_mean`` and faster on a cohort's stacked
    activations, where ``var_mean``'s single-pass kernel dominated HybridNorm's cost."""
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).square().mean(dim=dims, keepdim=keepdim)
    return var, mean if keepdim else mean.squeeze(dims)


@NORMS.register("hybrid")
@norm_layer(batch_statistics=True, statistics=RUNNING_STATISTICS)
class HybridNorm(nn.Module):
    """A learnable mix of batch and layer statistics, ``alpha = sigmoid(theta)`` per layer.

    Normalises with ``mean = α·μ_batch + (1−α)·μ_layer`` and ``var = α·σ²_batch + (1−α)·σ²_layer``
    (biased variances), where batch statistics are per channel over (N, H, W) and layer
    statistics per sample over (C, H, W); then a per-channel affine. In eval mode the batch
    part uses running mean/var, updated as BN does. α = 1 is BN, α = 0 is LN, so training
    ``theta`` lets each layer choose how much it relies on the (client-specific) batch; a
    two-way, one-scalar form of Switchable Normalization (Luo et al. 2019).
    """

    def __init__(
        self,
        num_channels: int,
        theta_init: float = 0.0,
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.theta = nn.Parameter(torch.tensor(float(theta_init)))
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @property
    def alpha(self) -> float:
        """Weight of the batch statistics, ``sigmoid(theta)`` in [0, 1]."""
        return torch.sigmoid(self.theta.detach()).item()

    def forward(self, x: Tensor) -> Tensor:
        check_features(x, type(self).__name__)
        shape = (1, self.num_channels) + (1,) * (x.dim() - 2)
        batch_dims = [0, *range(2, x.dim())]
        alpha = torch.sigmoid(self.theta)
        if self.training:
            n = x.numel() // self.num_channels
            if n <= 1:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input size "
                    f"{list(x.shape)}"
                )
            var_b, mu_b = _var_mean(x, batch_dims, keepdim=False)
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mu_b, self.momentum)
                self.running_var.lerp_(var_b * (n / (n - 1)), self.momentum)
        else:
            mu_b, var_b = self.running_mean, self.running_var
        var_l, mu_l = _var_mean(x, list(range(1, x.dim())), keepdim=True)
        mean = alpha * mu_b.view(shape) + (1 - alpha) * mu_l
        var = alpha * var_b.view(shape) + (1 - alpha) * var_l
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, momentum={self.momentum}"


NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    BatchNorm,
    InstanceNorm,
    GroupNorm,
    LayerNorm,
    RMSNorm,
    HybridNorm,
)
"""Classes ``make_norm`` returns (``none`` aside); :data:`NORM_LAYERS` lists them and torch's."""

# torch.nn's public norm layers, by type: BatchNorm (and the lazy and synchronised forms)
# mixes the batch; InstanceNorm does not, but keeps running statistics when asked to
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
             nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d):
    register_norm_layer(_cls, batch_statistics=True, statistics=RUNNING_STATISTICS)
for _cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
             nn.LazyInstanceNorm1d, nn.LazyInstanceNorm2d, nn.LazyInstanceNorm3d):
    register_norm_layer(_cls, batch_statistics=False, statistics=RUNNING_STATISTICS)
for _cls in (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm):
    register_norm_layer(_cls, batch_statistics=False)
del _cls


@functools.cache
def _options(ctor: Callable[..., nn.Module]) -> frozenset[str] | None:
    """Keyword options ``ctor`` takes after the channel count; None if it takes ``**kwargs``."""
    params = list(inspect.signature(ctor).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL)


def make_norm(kind: str, num_channels: int, **options: object) -> nn.Module:
    """Build the ``kind`` norm layer for ``num_channels`` channels.

    ``options`` may hold settings of any registered kind (``groups``, ``theta_init``, ``eps``,
    ``momentum``); each kind receives the ones it takes, so callers pass one common set. An
    option no registered kind takes is a TypeError (a typo, not something to ignore).
    """
    ctor = NORMS.get(kind, key="model.norm")
    known = [_options(NORMS.get(name)) for name in NORMS]
    if None not in known:  # no kind takes **kwargs, so every option must be someone's
        unknown = set(options).difference(*known)
        if unknown:
            valid = sorted(frozenset().union(*known))
            raise TypeError(f"make_norm got unknown option(s) {sorted(unknown)}; known: {valid}")
    takes = _options(ctor)
    kwargs = options if takes is None else {k: v for k, v in options.items() if k in takes}
    return ctor(num_channels, **kwargs)


def uses_batch_statistics(kind: str) -> bool:
    """Whether the ``kind`` layer normalises with statistics shared across the batch."""
    ctor = NORMS.get(kind, key="model.norm")
    spec = norm_spec(ctor) if isinstance(ctor, type) else None
    return spec is not None and spec.batch_statistics


def has_statistics(kind: str) -> bool:
    """Whether a ``kind`` layer keeps buffers that summarise the data it saw (running
    statistics: BN, HybridNorm), which a client then uploads unless a strategy keeps them."""
    return any(has_running_statistics(m) for m in make_norm(kind, 4).modules())


#: the named norm layers of a model (:func:`norm_layers`; the name models/__init__ exports)
norm_modules = norm_layers


def theta_for_alpha(alpha: float) -> float:
    """The HybridNorm ``theta`` whose sigmoid is ``alpha``: ``log(alpha / (1 - alpha))``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return math.log(alpha / (1 - alpha))


def hybrid_alphas(model: nn.Module) -> dict[str, float]:
    """Module name → alpha (weight of batch statistics) for every HybridNorm in ``model``."""
    return {name: m.alpha for name, m in model.named_modules() if isinstance(m, HybridNorm)}


__all__ = [
    "NORMS",
    "NORM_LAYERS",
    "NORM_LAYER_TYPES",
    "RUNNING_STATISTICS",
    "BatchNorm",
    "GroupNorm",
    "HybridNorm",
    "InstanceNorm",
    "LayerNorm",
    "NormIndex",
    "RMSNorm",
    "NormSpec",
    "group_count",
    "has_running_statistics",
    "hybrid_alphas",
    "index_norm_layers",
    "is_norm_layer",
    "layer_uses_batch_statistics",
    "make_norm",
    "model_uses_batch_statistics",
    "norm_keys",
    "norm_layer",
    "norm_layers",
    "norm_modules",
    "norm_spec",
    "norm_statistics_keys",
    "register_norm_layer",
    "statistics_buffers",
    "statistics_layers",
    "theta_for_alpha",
    "uses_batch_statistics",
]
