"""Vectorized evaluation: many clients' own models tested at once with ``vmap``.

Personalized evaluation (FedBN, SiloBN, a user's local layers) tests every evaluated client
with its own model: the global arrays, its saved local arrays laid over them, or, for a
client that never trained, BN running statistics re-estimated on its local train data (the
hooks' cold start). Run one client at a time that is two small forward passes and a model
load per client; here a cohort's clients run together. Arrays every client shares (the
global conv weights under FedBN) enter ``vmap`` unbatched, so their layers run as one plain
batched call; per-client arrays are stacked. The hooks act on arrays (``on_receive``) and
the loss and accuracy are the client computation's (:func:`fedsim.models.sgd_step.eval_sums`),
so each client's results equal ``fedsim.client.app.handle_evaluate``'s within float
tolerance.

Used by the in-process grid for evaluate messages (:class:`CohortEvaluator`, with
``engine.vectorize``) and by the server for holdout clients.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, Context, Message
from torch import nn
from torch.func import functional_call, vmap

from fedsim.client.hooks import ClientHook, statistics_parts
from fedsim.client.messages import ClientRequest, decode, error_reply, evaluate_reply
from fedsim.client.pipeline import client_start
from fedsim.client.runtime import ClientRuntime
from fedsim.client.step import GlobalArrays
from fedsim.client.train import eval_batches
from fedsim.models.bn_statistics import kept_modes
from fedsim.models.norm import layer_uses_batch_statistics
from fedsim.models.sgd_step import eval_sums

#: (mean loss, accuracy, number of test samples), as ``fedsim.client.train.evaluate``
EvalResult = tuple[float, float, int]


@dataclass
class EvalMember:
    """One client's model state and local test split.

    Tensors that are the *same object* for every member of a cohort are passed to ``vmap``
    once, unbatched. ``estimate_x`` and ``estimate_layers`` (module names): re-estimate those
    layers' running statistics on ``estimate_x`` first, as
    :func:`fedsim.client.hooks.estimate_statistics` does (a cold start).
    """

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    estimate_x: torch.Tensor | None = None
    estimate_layers: tuple[str, ...] = field(default_factory=tuple)


#: input elements (samples × pixels) per ``vmap`` call, all clients together: bounds the
#: activations of large cohorts (~2,700 MNIST images, ~33,000 8×8 ones)
MAX_ELEMENTS = 2**21


@torch.no_grad()
def evaluate_cohort(model: nn.Module, members: Sequence[EvalMember],
                    bn_eval: str = "running") -> list[EvalResult]:
    """Each member's (loss, accuracy, n) on its test split, with cold starts done first;
    ``bn_eval = "batch"``: BN layers normalise each test batch with its own statistics, as
    :func:`fedsim.client.train.evaluate` does (:func:`_evaluate_batch_statistics`)."""
    if not members:
        return []
    params = [dict(m.params) for m in members]
    buffers = [dict(m.buffers) for m in members]
    cold: dict[tuple, list[int]] = {}  # same layers and chunk sizes: one estimation group
    for i, m in enumerate(members):
        if m.estimate_x is not None and m.estimate_layers and len(m.estimate_x):
            parts = torch.tensor_split(torch.arange(len(m.estimate_x)),
                                       statistics_parts(len(m.estimate_x)))
            cold.setdefault((m.estimate_layers, tuple(len(p) for p in parts)), []).append(i)
    numel = max(1, math.prod(members[0].x.shape[1:]))  # elements per sample
    with warnings.catch_warnings():  # vmap's "no batching rule for lerp_" notice (hybrid)
        warnings.filterwarnings("ignore", message="There is a performance drop")
        was_training = model.training
        try:
            for (layers, sizes), group in cold.items():
                per_call = max(1, MAX_ELEMENTS // (max(sizes) * numel))
                for k in range(0, len(group), per_call):
                    _estimate(model, layers, sizes, group[k : k + per_call], members, params,
                              buffers)
            if bn_eval == "batch":
                return _evaluate_batch_statistics(model, members, params, buffers, numel)
            width = max(1, max(len(m.y) for m in members))
            per_call = max(1, MAX_ELEMENTS // (width * numel))
            results = []
            for k in range(0, len(members), per_call):
                part = slice(k, k + per_call)
                results += _evaluate(model, members[part], params[part], buffers[part],
                                     max(1, MAX_ELEMENTS // numel))
            return results
        finally:
            model.train(was_training)


def _split_shared(dicts: list[dict[str, torch.Tensor]], stack: frozenset[str] = frozenset()
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(arrays every dict holds as the same object, the others and ``stack`` stacked along
    dim 0)."""
    first = dicts[0]
    shared = {n: t for n, t in first.items()
              if n not in stack and all(d[n] is t for d in dicts)}
    stacked = {n: torch.stack([d[n] for d in dicts]) for n in first if n not in shared}
    return shared, stacked


def _forward(model: nn.Module, shared: dict, stacked: dict, x: torch.Tensor) -> torch.Tensor:
    def call(stacked_arrays, xb):
        return functional_call(model, (shared, stacked_arrays), (xb,))
    return vmap(call)(stacked, x)


def _estimate(model: nn.Module, layers: tuple[str, ...], sizes: tuple[int, ...],
              group: list[int], members: Sequence[EvalMember], params: list[dict],
              buffers: list[dict]) -> None:
    """AdaBN over ``group``'s train data: chunk ``k`` in train mode with momentum 1/(k+1)."""
    modules = [model.get_submodule(name) for name in layers]
    prefixes = tuple(f"{name}." if name else "" for name in layers)
    # the estimated buffers are per client and updated in place: always stacked
    estimated = frozenset(n for n in buffers[group[0]] if n.startswith(prefixes))
    shared, stacked = _split_shared([{**params[i], **buffers[i]} for i in group], estimated)
    xs = torch.stack([members[i].estimate_x for i in group])
    saved = [(m, m.momentum) for m in modules]
    model.eval()
    for m in modules:
        m.train()
    try:
        start = 0
        for k, size in enumerate(sizes):
            for m in modules:
                m.momentum = 1.0 / (k + 1)
            _forward(model, shared, stacked, xs[:, start:start + size])
            start += size
    finally:
        for m, momentum in saved:
            m.momentum = momentum
    for j, i in enumerate(group):
        for n in buffers[i]:
            if n in stacked:
                buffers[i][n] = stacked[n][j]


def _evaluate(model: nn.Module, members: Sequence[EvalMember], params: list[dict],
              buffers: list[dict], max_samples: int) -> list[EvalResult]:
    """Eval-mode forward of ``members``' test splits, padded to the longest (samples are
    independent in eval mode, so padding is inert), at most ``max_samples`` per call."""
    model.eval()
    shared, stacked = _split_shared([{**p, **b} for p, b in zip(params, buffers)])
    sizes = [len(m.y) for m in members]
    width = max(1, max(sizes))
    first = members[0].x
    xs = first.new_zeros((len(members), width, *first.shape[1:]))
    ys = torch.zeros((len(members), width), dtype=torch.long, device=first.device)
    mask = torch.zeros((len(members), width), dtype=torch.bool, device=first.device)
    for i, m in enumerate(members):
        xs[i, : sizes[i]] = m.x
        ys[i, : sizes[i]] = m.y
        mask[i, : sizes[i]] = True
    step = max(1, max_samples // len(members))  # a client larger than a call: split it
    logits = torch.cat([_forward(model, shared, stacked, xs[:, j : j + step])
                        for j in range(0, width, step)], dim=1)
    loss, hits = eval_sums(logits, ys, mask)
    loss, hits = loss.cpu(), hits.cpu()
    return [(loss[i].item() / n, hits[i].item() / n, n) if n else (float("nan"), float("nan"), 0)
            for i, n in enumerate(sizes)]


def _evaluate_batch_statistics(model: nn.Module, members: Sequence[EvalMember],
                               params: list[dict], buffers: list[dict], numel: int
                               ) -> list[EvalResult]:
    """``model.bn_eval = "batch"``: a batch's statistics enter every prediction, so members
    run in groups of equal test-split size (no padding) over the same test batches as one
    client at a time (:func:`fedsim.client.train.eval_batches`), with the batch-statistics
    layers in train mode on per-member copies of their buffers (the members' own are left
    as they were)."""
    layers = {n for n, m in model.named_modules() if layer_uses_batch_statistics(m)}
    prefixes = tuple(f"{n}." if n else "" for n in layers)
    results: list[EvalResult | None] = [None] * len(members)
    by_size: dict[int, list[int]] = {}
    for i, m in enumerate(members):
        by_size.setdefault(len(m.y), []).append(i)
    with kept_modes(model):
        model.eval()
        for m in model.modules():
            if layer_uses_batch_statistics(m):
                m.train()
        for n, group in by_size.items():
            if n == 0:
                for i in group:
                    results[i] = (float("nan"), float("nan"), 0)
                continue
            per_call = max(1, MAX_ELEMENTS // (n * numel))
            for k in range(0, len(group), per_call):
                sub = group[k : k + per_call]
                state = [{**params[i], **buffers[i]} for i in sub]
                stack = frozenset(b for b in buffers[sub[0]] if b.startswith(prefixes))
                shared, stacked = _split_shared(state, stack)  # statistics: stacked copies
                xs = torch.stack([members[i].x for i in sub])
                ys = torch.stack([members[i].y for i in sub])
                loss = torch.zeros(len(sub), dtype=torch.float64, device=xs.device)
                hits = torch.zeros(len(sub), dtype=torch.int64, device=xs.device)
                for part in eval_batches(n):
                    batch_loss, batch_hits = eval_sums(
                        _forward(model, shared, stacked, xs[:, part]), ys[:, part])
                    loss += batch_loss
                    hits += batch_hits
                loss, hits = loss.cpu(), hits.cpu()
                for j, i in enumerate(sub):
                    results[i] = (loss[j].item() / n, hits[j].item() / n, n)
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- members


class MemberBuilder:
    """Builds each client's :class:`EvalMember` from the global arrays and its hooks.

    Every hook acts on arrays (``on_receive``), so the client's arrays are a shared copy of
    the global ones with its overrides laid over them (no model load;
    :func:`fedsim.client.pipeline.client_start`, as every client starts), and a cold start
    the hooks ask for becomes an estimation done in the cohort. Several cold starts in a
    row are served eagerly on the model, as one client at a time would.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.global_arrays = GlobalArrays(model)

    def __call__(self, record: ArrayRecord, hooks: list[ClientHook], x: torch.Tensor,
                 y: torch.Tensor, local_train: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                 ) -> EvalMember:
        params, buffers = self.global_arrays(record)
        arrays = client_start(self.model, params, buffers, hooks, local_train, defer_one=True)
        member = EvalMember({n: arrays[n] for n in params}, {n: arrays[n] for n in buffers},
                            x, y)
        if arrays.estimates:
            member.estimate_layers = arrays.estimates[0]
            device = next(iter(params.values())).device
            member.estimate_x = local_train()[0].to(device)
        return member


# --------------------------------------------------------------------------- the grid's side


class CohortEvaluator:
    """The in-process grid's ``cohort_evaluator``: evaluate messages in, one reply each.

    Runs what ``fedsim.client.app.handle_evaluate`` runs per client — the same decoding and
    replies (:mod:`fedsim.client.messages`), the hooks' ``on_receive`` in evaluate mode, the
    same loss and accuracy (:func:`fedsim.models.sgd_step.eval_sums`) — with the clients'
    forward passes in one ``vmap`` cohort; a client whose preparation fails gets an error
    reply, the others are unaffected. ``runtime`` is the run's client runtime, shared with
    the ClientApp.
    """

    def __init__(self, runtime: ClientRuntime) -> None:
        self.runtime = runtime

    def __call__(self, msgs: Sequence[Message], contexts: Sequence[Context]) -> list[Message]:
        rt = self.runtime
        build = MemberBuilder(rt.cohort_model)
        replies: list[Message | None] = [None] * len(msgs)
        prepared: list[tuple[int, ClientRequest, EvalMember]] = []
        for i, (msg, ctx) in enumerate(zip(msgs, contexts)):
            cid = None
            try:
                cid = rt.client_id(ctx)

                def local_train(cid=cid):
                    return rt.client_train(cid)  # on the device, copied once per run

                req = decode(msg, ctx, rt.settings, cid, local_train)
                x, y = rt.client_test(cid)  # on the run's device, copied once per run
                member = build(req.arrays, req.hooks, x, y, local_train)
                prepared.append((i, req, member))
            except Exception as exc:
                replies[i] = error_reply(msg, exc, cid)
        results = evaluate_cohort(rt.cohort_model, [p[2] for p in prepared],
                                  bn_eval=rt.settings.bn_eval)
        for (i, req, _), (loss, acc, n) in zip(prepared, results):
            replies[i] = evaluate_reply(req, loss, acc, n)
        return replies  # type: ignore[return-value]
