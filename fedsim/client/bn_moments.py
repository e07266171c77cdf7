"""What a client computes for ``server.bn_statistics`` (:mod:`fedsim.server.bn_statistics`),
one client at a time; the cohort backend computes the same in
:mod:`fedsim.engine.cohort_moments`.

- **pooled**: after local training, the running statistics a client uploads are replaced by
  exact moments of each BN layer's input over its whole training data under the weights it
  trained (eval mode, layer by layer in call order, each layer seeing the earlier ones
  normalise with their new statistics: :func:`fedsim.models.bn_statistics.exact_statistics`),
  with the count of values per channel behind each. The server can then pool them exactly.
  BN's own running statistics would not do: with momentum 0.1 they are an exponential
  average over the last batches, each normalised by the batch's statistics and taken at a
  different point of training, so no weighting makes them the moments of the client's data.
- **recalibrate**: a query names one BN layer; the client answers with the moments of that
  layer's input, under the global arrays the query carries, over its training data.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
from torch import nn

from fedsim.models.bn_statistics import (
    Moments,
    bn_layers,
    exact_statistics,
    input_moments,
    is_bn_layer,
)


def statistics_keys(name: str) -> tuple[str, str]:
    """State-dict keys of BN layer ``name``'s running mean and variance."""
    prefix = f"{name}." if name else ""
    return f"{prefix}running_mean", f"{prefix}running_var"


def upload_exact_moments(model: nn.Module, x: torch.Tensor,
                         arrays: MutableMapping[str, torch.Tensor]) -> dict[str, int]:
    """Replace the running statistics in ``arrays`` (a client's upload, after its hooks'
    ``on_reply``) by exact moments of ``model``'s (the trained model's) BN-layer inputs over
    ``x``; returns the count of values per channel of each replaced layer. Layers whose
    statistics the upload does not hold (kept local or frozen by a hook) are left alone.
    ``model``'s own running statistics end up replaced too."""
    layers = [(n, m) for n, m in bn_layers(model, x)
              if all(k in arrays for k in statistics_keys(n))]
    if not layers:
        return {}
    counts = exact_statistics(model, x, layers)
    for name, layer in layers:
        mean_key, var_key = statistics_keys(name)
        arrays[mean_key] = layer.running_mean.detach().clone()
        arrays[var_key] = layer.running_var.detach().clone()
    return counts


def bn_layer(model: nn.Module, name: str) -> nn.Module:
    """``model``'s BN layer ``name`` (a module name); ValueError for any other module."""
    layer = model.get_submodule(name)
    if not is_bn_layer(layer):
        raise ValueError(f"{name!r} is a {type(layer).__name__}, not a BN layer with running "
                         "statistics")
    return layer


def layer_moments(model: nn.Module, layer: str, x: torch.Tensor) -> Moments:
    """Moments of BN layer ``layer``'s input (module name) over ``x`` under ``model``'s
    current arrays (eval mode)."""
    return input_moments(model, bn_layer(model, layer), x)

