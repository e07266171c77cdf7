"""BN moments for a cohort: what :mod:`fedsim.client.bn_moments` computes one client at a
time, for many clients at once (``server.bn_statistics``, :mod:`fedsim.server.bn_statistics`).

- :func:`cohort_exact_statistics` ("pooled"): each member's running statistics replaced by
  the exact moments of its BN-layer inputs under its *own* trained weights — the clients'
  stacked arrays run under ``vmap`` (``functional_call``) in eval mode, each forward pass
  stopped at the layer whose input it measures.
- :class:`CohortMoments` ("recalibrate"): the in-process grid's handler for recalibration
  queries. Every client of a query round holds the same global arrays, and in eval mode a
  model treats samples independently, so the cohort's data run concatenated through the
  shared weights (no ``vmap``, no padding) in chunks that may span clients, each client's
  moments taken over its own rows (:func:`fedsim.models.bn_statistics.segment_moments`).

For the per-client weights of "pooled" the clients' data are zero-padded to a common length
under ``vmap``, and the padding is masked out of the moments (eval mode: padded samples do
not touch the others). Either way the moments are the one-at-a-time path's (two passes per
chunk, float64 sums, chunks pooled by the law of total variance); the two agree within
float32 rounding of the layer inputs (summation order of batched kernels), not bit for bit.
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
    MOMENTS_BATCH,
    Moments,
    accumulate,
    chunk_moments,
    kept_modes,
    layer_input,
    parts,
    segment_moments,
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


#: samples per client in one ``vmap`` forward of the "pooled" exact pass: members run in
#: order of size, and a chunk runs only those that still have samples there, so small chunks
#: leave little padding. On the quickstart's 10 digits clients (30–77 samples, 1 thread, a
#: loaded 2-core machine) chunks of 32 took ~0.7x the time of one client at a time, whole
#: clients at once ~0.85x (alternated, median of 7)
EXACT_CHUNK = 32


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

    k = len(states)
    order = sorted(range(k), key=lambda i: -len(data[i]))  # longest first: active = a prefix
    sizes = [len(data[i]) for i in order]
    params = {n: stack(n)[order] for n in names_p}
    buffers = {n: stack(n)[order] for n in names_b}
    xs, valid = padded([data[i] for i in order])
    step = min(EXACT_CHUNK, _chunk(k, math.prod(xs.shape[2:])))
    counts: list[dict[str, int]] = [{} for _ in states]
    with kept_modes(model):
        model.eval()
        for name, layer in layers:
            def measure(p, b, x, layer=layer):
                return layer_input(layer, lambda: functional_call(model, (p, b), (x,)))
            acc: Moments | None = None
            for start in range(0, max(1, sizes[0]), step):
                active = max(1, sum(n > start for n in sizes))
                part = slice(start, start + step)
                h = vmap(measure)({n: t[:active] for n, t in params.items()},
                                  {n: t[:active] for n, t in buffers.items()},
                                  xs[:active, part])
                got = chunk_moments(h, valid[:active, part])
                acc = accumulate(acc, tuple(torch.cat([g, g.new_zeros((k - active,
                                                                       *g.shape[1:]))])
                                            for g in got))
            count, mean, var = acc
            mean_key, var_key = statistics_keys(name)
            buffers[mean_key].copy_(mean)
            buffers[var_key].copy_(unbiased(count, var))
            for j, i in enumerate(order):
                counts[i][name] = int(count[j].item())
    for name, _ in layers:
        for key in statistics_keys(name):
            rows = buffers[key].cpu()
            for j, i in enumerate(order):
                s = states[i]
                s[key] = rows[j].numpy() if isinstance(s[key], np.ndarray) else rows[j].clone()
    return counts


@torch.no_grad()
def cohort_layer_moments(model: nn.Module, layer: nn.Module, data: Sequence[torch.Tensor],
                         batch_size: int = MOMENTS_BATCH) -> Moments:
    """Per-member (count, mean, biased variance) of ``layer``'s input over ``data[i]``, all
    under ``model``'s own arrays: eval-mode forward passes over the members' concatenated
    data in chunks of ``batch_size`` samples (no padding; a chunk may span members), each
    member's moments taken over its own samples (:func:`~fedsim.models.bn_statistics.
    segment_moments`). Shapes ``(k,)``, ``(k, C)``, ``(k, C)``."""
    k = len(data)
    x = torch.cat(list(data))
    owner = torch.repeat_interleave(torch.arange(k, device=x.device),
                                    torch.tensor([len(d) for d in data], device=x.device))
    acc: Moments | None = None
    with kept_modes(model):
        model.eval()
        for part in parts(len(x), batch_size):
            xb = x[part]
            h = layer_input(layer, lambda xb=xb: model(xb))
            acc = accumulate(acc, segment_moments(h, owner[part], k))
    if acc is None:  # no member has data
        c = layer.running_mean.numel()
        zero = torch.zeros((k, c), dtype=torch.float64)
        return torch.zeros(k, dtype=torch.float64), zero, zero.clone()
    return acc


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
