"""A client's local SGD steps: one step loop, parameterised by a backend and a gradient rule.

The loop (:func:`local_steps`) is the same for every way a client's round runs. At each
step the members that still have a batch take it:

1. the **gradient rule** asks the backend for the step's data gradient: the gradient of the
   batch's mean loss plus the hooks' loss terms (:class:`BatchMean`, plain SGD), or
   per-sample gradients that DP-SGD clips, sums and noises
   (:class:`fedsim.models.dp_sgd.DPSGD`, a per-sample transform of the gradient);
2. the hooks' gradient transforms (SCAFFOLD's correction) apply to it;
3. the SGD update (:class:`fedsim.models.sgd_step.SGD`) moves the parameters.

A **backend** says where the arithmetic runs: :class:`OneClient` runs one client on its own
module (in place, or functionally and differentiably for an attacker that simulates a
client); :class:`fedsim.engine.vectorized.CohortBackend` runs a cohort under ``vmap`` on
stacked parameters. What a client starts from, its hooks and its batches come from the
caller (:mod:`fedsim.client.pipeline` prepares them from a message; the inversion attack
from what it knows), so this module is torch only: no Flower, no messages (FedJAX's
``for_each_client`` split: ``client_init`` / ``client_step`` / ``client_final``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedsim.config import ClientConfig
from fedsim.models.sgd_step import (
    NO_TERMS,
    SGD,
    HookTerms,
    Tensors,
    TrainResult,
    cross_entropy,
    hits,
    hook_loss,
    transform_grads,
)

# --------------------------------------------------------------------------- batch plans


class BatchPlan(Protocol):
    """A client's batches for one round: ``steps`` of them, drawn in order by ``batch``."""

    steps: int

    def batch(self, t: int) -> torch.Tensor:
        """The sample indices of step ``t`` (``t`` = 0, 1, ... in order)."""


@dataclass
class FixedBatches:
    """Batches drawn before the steps (:func:`plan_batches`), the same on every backend."""

    batches: list[torch.Tensor]

    @property
    def steps(self) -> int:
        return len(self.batches)

    def batch(self, t: int) -> torch.Tensor:
        return self.batches[t]

    def capped(self, cap: int | None) -> FixedBatches:
        """At most ``cap`` steps (None: all)."""
        return self if cap is None else FixedBatches(self.batches[:cap])

    def to(self, device: torch.device) -> FixedBatches:
        """The same batches on ``device``, in one copy (not one per batch)."""
        if not self.batches or self.batches[0].device == torch.device(device):
            return self
        sizes = [len(b) for b in self.batches]
        return FixedBatches(list(torch.cat(self.batches).to(device).split(sizes)))


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


# --------------------------------------------------------------------------- the loop


@dataclass
class Step:
    """One step of some of a backend's members: ``members`` (indices into the backend's
    members) take step ``t`` on batches ``idx`` (one client: ``(B,)``; a cohort:
    ``(m, B)``), ``weight`` 0 marking padded samples (None: no padding), ``sizes`` each
    member's real batch size. ``sel`` selects the members' rows of a cohort's stacks."""

    t: int
    members: Sequence[int]
    idx: torch.Tensor
    sizes: Sequence[int]
    weight: torch.Tensor | None = None
    sel: object = None
    cache: dict = field(default_factory=dict)  # what a backend computes once per step


class Backend(Protocol):
    """Where a client's steps run: the loop's side of :class:`OneClient` and of a cohort.

    Gradients come as dicts of tensors by parameter name, laid out as the backend holds its
    parameters (one client: the parameters' shapes; a cohort: stacked along dim 0), except
    :meth:`sample_grads`, which always has a members dimension first (``(m, B, ...)``,
    :meth:`unstack` turns ``(m, ...)`` sums back into the backend's layout)."""

    def steps(self) -> Iterator[Step]: ...

    def mean_grads(self, step: Step) -> Tensors: ...

    def sample_grads(self, step: Step) -> tuple[Tensors, torch.Tensor | None]: ...

    def term_grads(self, step: Step) -> Tensors | None: ...

    def unstack(self, grads: Tensors) -> Tensors: ...

    def transform(self, step: Step, grads: Tensors) -> Tensors: ...

    def update(self, step: Step, grads: Tensors) -> None: ...

    def step_plans(self, step: Step) -> list[BatchPlan]: ...

    def like(self) -> Tensors: ...


class GradientRule(Protocol):
    """How a step's data gradient is made from the backend's (:class:`BatchMean`,
    :class:`fedsim.models.dp_sgd.DPSGD`), and what a client reports afterwards."""

    def gradients(self, backend: Backend, step: Step) -> Tensors: ...

    def result(self, loss_sum: float, hit_count: int, seen: int, n: int, steps: int
               ) -> TrainResult: ...


def local_steps(backend: Backend, rule: GradientRule) -> None:
    """The step loop: every step's data gradient by ``rule``, the hooks' transforms, the SGD
    update, on ``backend``."""
    for step in backend.steps():
        grads = rule.gradients(backend, step)
        backend.update(step, backend.transform(step, grads))


class BatchMean:
    """Plain SGD's gradient: of the batch's mean cross-entropy plus the hooks' loss terms.

    A client whose plan has no step reports NaN loss and accuracy on 0 examples."""

    def gradients(self, backend: Backend, step: Step) -> Tensors:
        return backend.mean_grads(step)

    def result(self, loss_sum: float, hit_count: int, seen: int, n: int, steps: int
               ) -> TrainResult:
        if seen == 0:
            return TrainResult(float("nan"), float("nan"), 0, 0)
        return TrainResult(loss_sum / seen, hit_count / seen, n, steps)


BATCH_MEAN = BatchMean()


def per_sample_loss(model: nn.Module):
    """``(params, buffers, x_i, y_i) -> (loss, (loss, logits))`` of one sample run through
    ``model`` alone (a batch of one): the function DP-SGD differentiates per sample."""

    def loss_one(params, buffers, xi, yi):
        logits = functional_call(model, (params, buffers), (xi.unsqueeze(0),))
        loss = F.cross_entropy(logits, yi.unsqueeze(0))
        return loss, (loss.detach(), logits.squeeze(0).detach())

    return loss_one


# --------------------------------------------------------------------------- one client


class OneClient:
    """One client's steps on its own module: the sequential backend.

    In place (the default), the module runs its own forward and backward pass (no
    functional call per step: this path serves one client at a time, where that overhead
    would show) and its parameters and buffers are updated in place. ``functional``: the
    module is left as it is; the steps run on copies of its trainable parameters and
    buffers through ``functional_call``, out of place, so the upload is a differentiable
    function of the data with ``create_graph`` (gradient inversion simulates a client that
    way). The module's modes are the caller's (``train_modes``).
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: BatchPlan,
                 sgd: SGD, terms: HookTerms = NO_TERMS, *, functional: bool = False,
                 create_graph: bool = False) -> None:
        self.model, self.x, self.y, self.sgd, self.terms = model, x, y, sgd, terms
        if isinstance(plan, FixedBatches) and x.device.type != "cpu":
            plan = plan.to(x.device)  # drawn on a CPU generator: one copy to the device
        self.plan = plan
        self.functional = functional or create_graph
        self.create_graph = create_graph
        named = dict(model.named_parameters())
        self.trainable = [n for n, p in named.items() if p.requires_grad]
        if self.functional:
            self.params = {n: named[n].detach().requires_grad_() for n in self.trainable}
            self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        else:
            self.params = named
        self.momentum: Tensors = {}
        self._losses: list[torch.Tensor] = []  # per step: a loss tensor, and its weight
        self._weights: list[int] = []
        self._hits: list[torch.Tensor] = []
        self.seen = 0

    # -- the loop's side
    def steps(self) -> Iterator[Step]:
        for t in range(self.plan.steps):
            idx = self.plan.batch(t)
            if idx.device != self.x.device:
                idx = idx.to(self.x.device)
            yield Step(t, (0,), idx, (len(idx),))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.functional:
            return functional_call(self.model, (self.params, self.buffers), (x,))
        return self.model(x)

    def _grad(self, loss: torch.Tensor) -> Tensors:
        got = torch.autograd.grad(loss, [self.params[n] for n in self.trainable],
                                  allow_unused=True, create_graph=self.create_graph)
        return {n: g for n, g in zip(self.trainable, got) if g is not None}

    def _term(self) -> torch.Tensor | None:
        if not self.terms:
            return None
        return hook_loss(self.terms.active_hooks, self.params, self.terms.active_states)

    def mean_grads(self, step: Step) -> Tensors:
        yb = self.y[step.idx]
        logits = self.forward(self.x[step.idx])
        loss = cross_entropy(logits, yb)
        extra = self._term()
        grads = self._grad(loss if extra is None else loss + extra)
        self._losses.append(loss.detach())  # the batch's mean: weighed by its size
        self._weights.append(len(step.idx))
        self._hits.append(hits(logits.detach(), yb))
        self.seen += len(step.idx)
        return grads

    def sample_grads(self, step: Step) -> tuple[Tensors, torch.Tensor | None]:
        params = {n: self.params[n].detach() for n in self.trainable}
        buffers = self.buffers if self.functional else {
            n: b.detach() for n, b in self.model.named_buffers()}
        xb, yb = self.x[step.idx], self.y[step.idx]
        per_sample = vmap(grad(per_sample_loss(self.model), has_aux=True),
                          in_dims=(None, None, 0, 0))
        grads, (losses, logits) = per_sample(params, buffers, xb, yb)
        self._losses.append(losses.double().sum())  # already a sum: weight 1
        self._weights.append(1)
        self._hits.append((logits.argmax(1) == yb).sum())
        self.seen += len(step.idx)
        return {n: g.unsqueeze(0) for n, g in grads.items()}, None

    def term_grads(self, step: Step) -> Tensors | None:
        extra = self._term()
        return None if extra is None else self._grad(extra)

    def unstack(self, grads: Tensors) -> Tensors:
        return {n: g[0] for n, g in grads.items()}

    def transform(self, step: Step, grads: Tensors) -> Tensors:
        if not self.terms:
            return grads
        return transform_grads(self.terms.active_hooks, grads, self.terms.active_states)

    def update(self, step: Step, grads: Tensors) -> None:
        new = self.sgd.update(self.params, grads, self.momentum, in_place=not self.functional)
        if self.functional:
            if not self.create_graph:  # each step's graph ends here
                new = {n: p.detach().requires_grad_() for n, p in new.items()}
                self.momentum = {n: b.detach() for n, b in self.momentum.items()}
            self.params.update(new)

    def step_plans(self, step: Step) -> list[BatchPlan]:
        return [self.plan]

    def like(self) -> Tensors:
        return {n: self.params[n] for n in self.trainable}

    # -- after the steps
    def result(self, rule: GradientRule) -> TrainResult:
        """What the client reports (``rule``'s reading of the steps' losses and hits)."""
        loss_sum = 0.0  # float64, batch by batch in order: one transfer, not one per step
        if self._losses:
            for value, w in zip(torch.stack(self._losses).double().tolist(), self._weights):
                loss_sum += value * w
        hit_count = int(torch.stack(self._hits).sum().item()) if self._hits else 0
        return rule.result(loss_sum, hit_count, self.seen, len(self.x), self.plan.steps)

    def trained(self) -> Tensors:
        """The trainable parameters after the steps (the module's own, in place)."""
        return {n: self.params[n] for n in self.trainable}


def run_one_client(backend: OneClient, rule: GradientRule = BATCH_MEAN) -> TrainResult:
    """:func:`local_steps` on one client; its result."""
    local_steps(backend, rule)
    return backend.result(rule)
