"""One client at a time: local training on a module (the step loop's one-client backend,
:class:`fedsim.models.local_sgd.OneClient`) and local evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedsim.client.hooks import ClientHook
from fedsim.config import ClientConfig
from fedsim.models.bn_statistics import batch_statistics
from fedsim.models.local_sgd import (
    BATCH_MEAN,
    BatchPlan,
    FixedBatches,
    GradientRule,
    OneClient,
    local_steps,
    plan_batches,
)
from fedsim.models.sgd_step import (
    NO_TERMS,
    SGD,
    HookTerms,
    Trained,
    TrainResult,
    eval_sums,
    eval_terms,
    train_modes,
)

__all__ = ["TrainResult", "evaluate", "evaluate_many", "plan_batches", "start_terms",
           "train_local", "train_on_module"]


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: ClientConfig,
    generator: torch.Generator,
    hooks: Sequence[ClientHook] = (),
    drop_singleton: bool = True,
) -> TrainResult:
    """Minibatch SGD on (x, y) in place, over :func:`~fedsim.models.local_sgd.plan_batches`'
    batches (``cfg.epochs`` epochs, or exactly ``cfg.local_steps`` steps, at most what a
    hook caps): the step loop on the module (:func:`train_on_module`)."""
    terms = start_terms(model, hooks)
    plan = FixedBatches(plan_batches(len(x), cfg, generator, drop_singleton))
    return train_on_module(model, x, y, cfg, plan.capped(terms.max_steps), BATCH_MEAN,
                           hooks, terms)


def train_on_module(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ClientConfig,
                    plan: BatchPlan, rule: GradientRule, hooks: Sequence[ClientHook] = (),
                    terms: HookTerms = NO_TERMS) -> TrainResult:
    """One client's round on ``model`` in place: the hooks' ``before_train`` modes, the step
    loop (:func:`~fedsim.models.local_sgd.local_steps` on
    :class:`~fedsim.models.local_sgd.OneClient`) over ``plan`` with ``rule``, then the
    hooks' ``after_train``."""
    train_modes(model, hooks)
    backend = OneClient(model, x, y, plan, SGD.of(cfg), terms)
    local_steps(backend, rule)
    for hook in hooks:
        hook.after_train(model, Trained(plan.steps, cfg.lr))
    return backend.result(rule)


def start_terms(model: nn.Module, hooks: Sequence[ClientHook]) -> HookTerms:
    """The hooks' step terms from the module's current parameters (a snapshot: the steps
    update the module in place)."""
    if not hooks:
        return NO_TERMS
    return HookTerms(hooks, {n: p.detach().clone() for n, p in model.named_parameters()})


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
