"""One client at a time: the sequential backend of the client computation
(:mod:`fedsim.client.step`), the batch plan every backend trains on, and local evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedsim.client.hooks import ClientHook
from fedsim.client.step import (
    SGD,
    HookTerms,
    Trained,
    cross_entropy,
    eval_sums,
    eval_terms,
    hits,
    hook_loss,
    train_modes,
    transform_grads,
)
from fedsim.config import ClientConfig
from fedsim.models.bn_statistics import batch_statistics


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the local steps
    accuracy: float  # training accuracy seen during the local steps
    num_examples: int
    steps: int


def batches(n: int, batch_size: int, generator: torch.Generator, drop_singleton: bool):
    """Shuffled index batches; a trailing batch of one is dropped when ``drop_singleton``.

    BatchNorm cannot compute batch statistics from a single vector, so models that use batch
    statistics drop a last batch of size 1 instead of crashing mid-run.
    """
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if drop_singleton and len(idx) == 1 and n > 1:
            continue
        yield idx


def plan_batches(n: int, cfg: ClientConfig, generator: torch.Generator,
                 drop_singleton: bool = True) -> list[torch.Tensor]:
    """The minibatch indices of one round of local training, in order.

    ``cfg.local_steps > 0``: exactly that many batches, cycling through fresh shuffles of the
    data (so batch sizes can be compared at a fixed number of steps, or of samples by scaling
    the steps). Otherwise ``cfg.epochs`` shuffled passes. A model with batch statistics at
    batch size 1 drops every batch, so it gets no step either way. Every backend trains on
    this plan, so a seed gives the same batches sequentially and in vectorized cohorts.
    """
    if n == 0:
        return []
    if cfg.local_steps <= 0:
        return [idx for _ in range(cfg.epochs)
                for idx in batches(n, cfg.batch_size, generator, drop_singleton)]
    plan: list[torch.Tensor] = []
    while len(plan) < cfg.local_steps:
        before = len(plan)
        for idx in batches(n, cfg.batch_size, generator, drop_singleton):
            plan.append(idx)
            if len(plan) == cfg.local_steps:
                break
        if len(plan) == before:  # every batch is a dropped singleton: no step is possible
            break
    return plan


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: ClientConfig,
    generator: torch.Generator,
    hooks: Sequence[ClientHook] = (),
    drop_singleton: bool = True,
) -> TrainResult:
    """Minibatch SGD on (x, y) in place, over :func:`plan_batches`' batches (``cfg.epochs``
    epochs, or exactly ``cfg.local_steps`` steps, at most what a hook caps): the sequential
    backend of :mod:`fedsim.client.step`.

    The module runs its own forward and backward pass (no functional call per step: this
    path serves one client at a time, where that overhead would show); the loss, the hooks'
    terms and transforms and the SGD update are the step module's, as in a cohort. Hooks'
    ``before_train`` set the modes first; ``after_train`` runs after the last step.
    """
    train_modes(model, hooks)
    params = dict(model.named_parameters())
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    leaves = list(trainable.values())
    terms = HookTerms(hooks, {n: p.detach().clone() for n, p in params.items()}) if hooks \
        else None
    plan = plan_batches(len(x), cfg, generator, drop_singleton)
    if terms is not None and terms.max_steps is not None:
        plan = plan[: terms.max_steps]
    if plan and x.device.type != "cpu":  # drawn on a CPU generator: one copy to the device
        plan = list(torch.cat(plan).to(x.device).split([len(i) for i in plan]))
    sgd, momentum = SGD.of(cfg), {}
    # per-step loss and hits stay on the device (no sync per step) and are summed once, below
    losses: list[torch.Tensor] = []
    right: list[torch.Tensor] = []
    for idx in plan:
        yb = y[idx]
        logits = model(x[idx])
        loss = cross_entropy(logits, yb)
        full = loss
        if terms:
            extra = hook_loss(terms.active_hooks, params, terms.active_states)
            if extra is not None:
                full = full + extra
        grads = {n: g for n, g in zip(trainable, torch.autograd.grad(full, leaves,
                                                                     allow_unused=True))
                 if g is not None}
        if terms:
            grads = transform_grads(terms.active_hooks, grads, terms.active_states)
        sgd.update(trainable, grads, momentum, in_place=True)
        losses.append(loss.detach())
        right.append(hits(logits.detach(), yb))
    for hook in hooks:
        hook.after_train(model, Trained(len(plan), cfg.lr))
    if not plan:
        return TrainResult(float("nan"), float("nan"), 0, 0)
    return TrainResult(*batch_means(losses, right, [len(idx) for idx in plan]), len(x),
                       len(plan))


def batch_means(losses: Sequence[torch.Tensor], right: Sequence[torch.Tensor],
                sizes: Sequence[int]) -> tuple[float, float]:
    """(mean loss, accuracy) over the samples of batches with mean losses ``losses``, hit
    counts ``right`` and ``sizes``: the loss summed in float64 batch by batch, in order
    (the same sum as accumulating a float64 tensor step by step, one transfer at the end)."""
    total = 0.0
    for value, n in zip(torch.stack(list(losses)).double().tolist(), sizes):
        total += value * n
    seen = sum(sizes)
    return total / seen, int(torch.stack(list(right)).sum().item()) / seen


def eval_batches(n: int, batch_size: int = 1024) -> list[slice]:
    """The test batches of ``n`` samples under ``model.bn_eval = "batch"``: ⌈n/batch_size⌉
    consecutive near-equal parts (never a lone trailing sample, whose batch statistics a BN
    layer after a linear layer could not compute), the same on every backend."""
    k = max(1, -(-n // batch_size))
    base, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        size = base + (i < extra)
        out.append(slice(start, start + size))
        start += size
    return out


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
             bn_eval: str = "running"):
    """(mean loss, accuracy, n) of ``model`` in eval mode on (x, y)
    (:func:`fedsim.client.step.eval_sums`).

    ``bn_eval = "batch"``: BN layers normalise each test batch (:func:`eval_batches`) with
    its own statistics, a train-mode forward that leaves their buffers as they were
    (:func:`fedsim.models.bn_statistics.batch_statistics`); a sample's prediction then
    depends on the others in its batch (transductive).
    """
    model.eval()
    if len(x) == 0:
        return float("nan"), float("nan"), 0
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    if bn_eval == "batch":
        with batch_statistics(model):
            for part in eval_batches(len(x), batch_size):
                batch_loss, batch_hits = eval_sums(model(x[part]), y[part])
                loss += batch_loss
                correct += batch_hits
        return loss.item() / len(x), correct.item() / len(x), len(x)
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        batch_loss, batch_hits = eval_sums(model(xb), yb)
        loss += batch_loss
        correct += batch_hits
    return loss.item() / len(x), correct.item() / len(x), len(x)


@torch.no_grad()
def evaluate_many(model: nn.Module, splits: list[tuple[torch.Tensor, torch.Tensor]],
                  batch_size: int = 1024, bn_eval: str = "running"
                  ) -> list[tuple[float, float, int]]:
    """``evaluate`` on each of ``splits`` at once: one pass over their concatenation.

    In eval mode every fedsim model treats samples independently (BN uses its running
    statistics), so concatenating many small client splits gives the same per-split results
    as evaluating each alone, with a few large batches instead of many small ones. With
    ``bn_eval = "batch"`` a batch's statistics are part of each prediction, so each split is
    evaluated on its own (:func:`evaluate`).
    """
    if bn_eval == "batch":
        return [evaluate(model, x, y, batch_size, bn_eval) for x, y in splits]
    model.eval()
    sizes = [len(y) for _, y in splits]
    if sum(sizes) == 0:
        return [(float("nan"), float("nan"), 0) for _ in splits]
    x = torch.cat([s[0] for s in splits])
    y = torch.cat([s[1] for s in splits])
    losses, rights = [], []
    for start in range(0, len(x), batch_size):
        loss, right = eval_terms(model(x[start : start + batch_size]),
                                 y[start : start + batch_size])
        losses.append(loss)
        rights.append(right)
    loss_all = torch.cat(losses).cpu()
    hit_all = torch.cat(rights).cpu()
    out, start = [], 0
    for n in sizes:
        if n == 0:
            out.append((float("nan"), float("nan"), 0))
        else:
            seg = slice(start, start + n)
            out.append((loss_all[seg].sum().item() / n, hit_all[seg].sum().item() / n, n))
        start += n
    return out
