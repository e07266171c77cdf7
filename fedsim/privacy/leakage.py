"""What leaves the client: the arrays it uploads, and the data statistics hidden in them.

A BatchNorm layer trained in train mode uploads its running statistics with the weights.
After one local batch they *are* that batch's per-channel mean and variance, and when the BN
acts on the input they are the client's data statistics (Huang et al., NeurIPS 2021;
Hatamizadeh et al., IEEE TMI 2023). GroupNorm and LayerNorm keep no running statistics and
upload affine parameters only. Layers are classified with ``isinstance`` on the owning module
and by torch's own attribute names, never by matching layer-type names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedsim.models.norm import has_running_statistics, is_norm_layer

#: Kinds an uploaded array can have, see :func:`uploaded_arrays`.
KINDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked", "other")
_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def has_running_stats(module: nn.Module) -> bool:
    """True for layers whose buffers summarize the data they saw: norm layers with running
    statistics (BatchNorm, the BN/LN mix, any type registered so in :mod:`fedsim.models.norm`)
    and, since a privacy report must not miss a channel, any unregistered module that keeps
    torch's ``running_mean`` buffer."""
    if is_norm_layer(module):
        return has_running_statistics(module)
    return isinstance(dict(module.named_buffers(recurse=False)).get("running_mean"),
                      torch.Tensor)


def uploaded_arrays(model: nn.Module, keys: Iterable[str] | None = None) -> list[dict[str, object]]:
    """Describe each state-dict entry a client uploads.

    Parameters
    ----------
    model
        The client's model.
    keys
        State-dict keys that are sent (e.g. all of them for FedAvg, no BN entries for FedBN);
        default: the whole state dict.

    Returns
    -------
    One dict per key: ``name``, ``kind`` (one of :data:`KINDS`; running statistics only for
    modules with running stats), ``layer_type`` (the owning module's class name, for
    reports) and ``shape``.
    """
    state = model.state_dict()
    names = list(state) if keys is None else list(keys)
    unknown = [k for k in names if k not in state]
    if unknown:
        raise KeyError(f"not in the model's state dict: {', '.join(unknown)}")
    rows = []
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attr in dict(owner.named_parameters(recurse=False)):
            kind = attr if attr in ("weight", "bias") else "other"
        elif attr in _RUNNING and has_running_stats(owner):
            kind = attr
        else:
            kind = "other"
        rows.append(
            {
                "name": name,
                "kind": kind,
                "layer_type": type(owner).__name__,
                "shape": tuple(state[name].shape),
            }
        )
    return rows


def recover_batch_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    momentum: float | None,
    num_batches: int = 1,
    prev_mean: torch.Tensor | float = 0.0,
    prev_var: torch.Tensor | float = 1.0,
    prev_num_batches: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo BatchNorm's running-statistics update to get the batches' mean and variance.

    With momentum m, PyTorch updates ``r ← (1 − m)·r + m·s`` per batch, where s is the batch
    mean or the *unbiased* batch variance (over B values for BN1d, B·H·W for BN2d). The server
    knows the statistics it sent (``prev_*``; a fresh layer starts at mean 0, variance 1), so
    after one batch ``s = (r − (1 − m)·prev) / m`` exactly. After k batches the same inversion,
    ``(r − (1 − m)^k·prev) / (1 − (1 − m)^k)``, gives the EMA-weighted average of the k batch
    statistics (weights ∝ (1 − m)^(k − i)), not each batch. With ``momentum=None`` (cumulative
    average, factor 1 / num_batches_tracked) it gives the plain average of the k batches, which
    needs the count the layer started from (``prev_num_batches``).

    Returns
    -------
    (mean, var) per channel; exact for ``num_batches == 1``.
    """
    if num_batches < 1:
        raise ValueError("num_batches must be at least 1 (no update, nothing to recover)")
    rm, rv = running_mean.detach().double(), running_var.detach().double()
    pm = torch.as_tensor(prev_mean, dtype=torch.float64)
    pv = torch.as_tensor(prev_var, dtype=torch.float64)
    if momentum is None:
        total = prev_num_batches + num_batches
        return (
            (total * rm - prev_num_batches * pm) / num_batches,
            (total * rv - prev_num_batches * pv) / num_batches,
        )
    if not 0 < momentum <= 1:
        raise ValueError(f"momentum must be in (0, 1], got {momentum}")
    decay = (1 - momentum) ** num_batches
    return (rm - decay * pm) / (1 - decay), (rv - decay * pv) / (1 - decay)


@dataclass(frozen=True)
class LeakedStats:
    """Per-channel statistics of a client's data recovered from its uploaded BN buffers.

    ``applies_to`` says what they describe: ``"input"`` (the BN is the first layer: the
    client's data itself) or ``"output of <layer>"`` (the BN follows one first layer, e.g. the
    first convolution). ``exact`` is True for one local batch; otherwise mean and var are an
    EMA-weighted average over ``num_batches`` batches (see :func:`recover_batch_stats`).
    """

    module: str
    applies_to: str
    mean: torch.Tensor
    var: torch.Tensor
    num_batches: int
    exact: bool


def _first_running_stats_layer(model: nn.Module) -> tuple[int, str, list[tuple[str, nn.Module]]]:
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    for index, (name, module) in enumerate(leaves):
        if has_running_stats(module):
            return index, name, leaves
    return -1, "", leaves


def input_stats_from_bn(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    prev_state: Mapping[str, torch.Tensor] | None = None,
    num_batches: int | None = None,
) -> LeakedStats | None:
    """Recover the client's data statistics from an uploaded state dict, if its BN leaks them.

    Looks at the first layer with running statistics, in module registration order (which is
    assumed to be execution order). It leaks the data statistics when it is the first leaf
    module (``applies_to="input"``) and the statistics of the first layer's output when it is
    the second (e.g. conv → BN). Deeper BN layers, layers without running statistics
    (GroupNorm, LayerNorm), or an upload without the BN buffers (FedBN, SiloBN) give None.

    Parameters
    ----------
    model
        The architecture (its BN momentum is read from the module).
    state_dict
        What the client uploaded.
    prev_state
        What the server sent at the start of the round; default: a fresh layer (mean 0,
        variance 1, no batches tracked).
    num_batches
        Local batches the client ran; default: the change in ``num_batches_tracked``.
    """
    index, name, leaves = _first_running_stats_layer(model)
    if index < 0 or index > 1:
        return None
    bn = leaves[index][1]
    if not hasattr(bn, "momentum"):
        raise ValueError(f"{name} has running statistics but no momentum attribute to invert")
    keys = {s: f"{name}.{s}" if name else s for s in _RUNNING}
    if keys["running_mean"] not in state_dict or keys["running_var"] not in state_dict:
        return None  # statistics kept local (FedBN / SiloBN): nothing leaks here
    prev = prev_state or {}
    # counters may arrive as floats after Flower's averaging (1.9999...): round, not truncate
    prev_count = round(float(prev.get(keys["num_batches_tracked"], 0)))
    if num_batches is None:
        if keys["num_batches_tracked"] not in state_dict:
            raise ValueError(f"{name} uploads no num_batches_tracked; pass num_batches explicitly")
        num_batches = round(float(state_dict[keys["num_batches_tracked"]])) - prev_count
    if num_batches < 1:
        return None  # no local batch went through the layer
    mean, var = recover_batch_stats(
        state_dict[keys["running_mean"]],
        state_dict[keys["running_var"]],
        bn.momentum,
        num_batches=num_batches,
        prev_mean=prev.get(keys["running_mean"], 0.0),
        prev_var=prev.get(keys["running_var"], 1.0),
        prev_num_batches=prev_count,
    )
    first_name, first = leaves[0]
    applies_to = "input" if index == 0 else f"output of {first_name} ({type(first).__name__})"
    return LeakedStats(name, applies_to, mean, var, num_batches, num_batches == 1)
