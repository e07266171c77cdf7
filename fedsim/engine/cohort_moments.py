"""BN moments for a cohort: what :mod:`fedsim.client.bn_moments` computes one client at a
time, for many clients at once (``server.bn_statistics``, :mod:`fedsim.server.bn_statistics`).

- :func:`cohort_exact_statistics` ("pooled"): each member's running statistics replaced by
  the exact moments of its BN-layer inputs under its *own* trained weights — the clients'
  stacked arrays run under ``vmap`` (``functional_call``) in eval mode, each forward pass
  stopped at the layer whose input it measures.
- :class:`CohortMoments` ("recalibrate"): the in-process grid's handler for recalibration
  queries. Every client of a query round holds the same global arrays, and in eval mode a
  model treats samples independently, so the cohort is one forward pass over the clients'
  stacked data with the shared weights (no ``vmap``), each client's moments taken over its
  own rows.

Clients' data are zero-padded to the largest and the padding is masked out of the moments
(eval mode: padded samples do not touch the others). The moments are float64 two-pass
moments per chunk pooled by the law of total variance
(:func:`fedsim.models.bn_statistics.chunk_moments`, :func:`~fedsim.models.bn_statistics.
accumulate`), as the one-at-a-time path computes them; the two agree within float32
rounding of the layer inputs (summation order of batched kernels), not bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message
from torch import nn
from torch.func import functional_call, vmap

from fedsim.arrays import load_record
from fedsim.client.bn_moments import bn_layer, statistics_keys
from fedsim.client.messages import bn_layer_asked, error_reply, moments_reply
from fedsim.client.runtime import ClientRuntime
from fedsim.models.bn_statistics import (
    Moments,
    accumulate,
    chunk_moments,
    kept_modes,
    layer_input,
    unbiased,
)
from fedsim.records import require_record

#: input elements (samples × pixels) per forward pass, all clients together (activations are
#: taken to float64 for the moments: a quarter of vectorized evaluation's bound)
MAX_ELEMENTS = 2**19


def padded(data: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The members' inputs as a zero-padded stack ``(k, n_max, ...)`` and the ``(k, n_max)``
    mask of real samples."""
    k, n_max = len(data), max(1, max(len(x) for x in data))
    first = data[0]
    xs = first.new_zeros((k, n_max, *first.shape[1:]))
    valid = torch.zeros((k, n_max), dtype=torch.bool, device=first.device)
    for i, x in enumerate(data):
        xs[i, : len(x)] = x
        valid[i, : len(x)] = True
    return xs, valid


def _chunk(k: int, per_sample: int) -> int:
    return max(1, MAX_ELEMENTS // max(1, k * per_sample))


@torch.no_grad()
def cohort_exact_statistics(model: nn.Module, states: Sequence[dict],
                            data: Sequence[torch.Tensor],
                            layers: Sequence[tuple[str, nn.Module]]) -> list[dict[str, int]]:
    """Replace, in each member's ``states[i]`` (its trained arrays by state-dict name:
    tensors or numpy arrays), the running statistics of ``layers`` (in call order) by the
    exact moments of their inputs over ``data[i]`` under that member's own arrays, layer by
    layer (earlier layers normalising with their new statistics), as
    :func:`fedsim.models.bn_statistics.exact_statistics` does for one model; returns each
    member's count of values per channel per layer."""
    if not states or not layers:
        return [{} for _ in states]
    device = data[0].device
    names_p = [n for n, _ in model.named_parameters()]
    names_b = [n for n, _ in model.named_buffers()]
    ref = dict(model.state_dict())

    def stack(name: str) -> torch.Tensor:
        rows = [torch.as_tensor(np.asarray(s[name]) if not isinstance(s[name], torch.Tensor)
                                else s[name]) for s in states]
        return torch.stack(rows).to(device=device, dtype=ref[name].dtype)

    params = {n: stack(n) for n in names_p}
    buffers = {n: stack(n) for n in names_b}
    xs, valid = padded(data)
    step = _chunk(len(states), math.prod(xs.shape[2:]))
    counts: list[dict[str, int]] = [{} for _ in states]
    with kept_modes(model):
        model.eval()
        for name, layer in layers:
            def measure(p, b, x, layer=layer):
                return layer_input(layer, lambda: functional_call(model, (p, b), (x,)))
            acc: Moments | None = None
            for start in range(0, xs.shape[1], step):
                part = slice(start, start + step)
                h = vmap(measure)(params, buffers, xs[:, part])
                acc = accumulate(acc, chunk_moments(h, valid[:, part]))
            count, mean, var = acc
            mean_key, var_key = statistics_keys(name)
            buffers[mean_key].copy_(mean)
            buffers[var_key].copy_(unbiased(count, var))
            for i in range(len(states)):
                counts[i][name] = int(count[i].item())
    for name, _ in layers:
        for key in statistics_keys(name):
            rows = buffers[key].cpu()
            for i, s in enumerate(states):
                s[key] = rows[i].numpy() if isinstance(s[key], np.ndarray) else rows[i].clone()
    return counts


@torch.no_grad()
def cohort_layer_moments(model: nn.Module, layer: nn.Module, data: Sequence[torch.Tensor]
                         ) -> Moments:
    """Per-member (count, mean, biased variance) of ``layer``'s input over ``data[i]``, all
    under ``model``'s own arrays: one eval-mode forward pass over the stacked data per
    chunk. Shapes ``(k,)``, ``(k, C)``, ``(k, C)``."""
    xs, valid = padded(data)
    k = len(data)
    step = _chunk(k, math.prod(xs.shape[2:]))
    acc: Moments | None = None
    with kept_modes(model):
        model.eval()
        for start in range(0, xs.shape[1], step):
            part = slice(start, start + step)
            chunk = xs[:, part]
            h = layer_input(layer, lambda chunk=chunk: model(chunk.flatten(0, 1)))
            acc = accumulate(acc, chunk_moments(h.unflatten(0, (k, -1)), valid[:, part]))
    return acc  # type: ignore[return-value]


class CohortMoments:
    """The in-process grid's handler for recalibration queries (``query.bn_moments``): the
    same answers as :func:`fedsim.client.app.handle_bn_moments`, with the clients that share
    one query's arrays and layer in one forward pass (:func:`cohort_layer_moments`). A client
    whose preparation fails gets an error reply; the others are unaffected."""

    def __init__(self, runtime: ClientRuntime) -> None:
        self.runtime = runtime

    def __call__(self, msgs: Sequence[Message], contexts: Sequence[Context]) -> list[Message]:
        rt = self.runtime
        model = rt.model  # the plain model: every client runs the same arrays, no vmap
        replies: list[Message | None] = [None] * len(msgs)
        groups: dict[tuple[int, str], list[tuple[int, int, torch.Tensor]]] = {}
        records: dict[int, ArrayRecord] = {}
        for i, (msg, ctx) in enumerate(zip(msgs, contexts)):
            cid = None
            try:
                cid = rt.client_id(ctx)
                record = require_record(msg.content, "arrays", ArrayRecord)
                layer = bn_layer_asked(msg)
                bn_layer(model, layer)  # a bad name fails this client here
                records[id(record)] = record
                groups.setdefault((id(record), layer), []).append((i, cid,
                                                                   rt.client_train(cid)[0]))
            except Exception as exc:
                replies[i] = error_reply(msg, exc, cid)
        for (rec_id, layer), members in groups.items():
            try:
                load_record(model, records[rec_id])
                count, mean, var = cohort_layer_moments(model, bn_layer(model, layer),
                                                        [x for _, _, x in members])
            except Exception as exc:
                for i, cid, _ in members:
                    replies[i] = error_reply(msgs[i], exc, cid)
                continue
            for j, (i, cid, _) in enumerate(members):
                replies[i] = moments_reply(msgs[i], cid, count[j], mean[j], var[j])
        return replies  # type: ignore[return-value]


__all__ = ["CohortMoments", "cohort_exact_statistics", "cohort_layer_moments", "padded"]
