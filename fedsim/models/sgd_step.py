"""What one local SGD step computes, written once: the loss, the hooks' terms, the update.

What a client computes in a step is defined here, apart from how clients are run (FedJAX's
``for_each_client`` split; pfl-research's Algorithm vs Backend). The step loop and its
backends (:mod:`fedsim.models.local_sgd`: one client on its module, a ``vmap`` cohort over
stacked parameter dicts in :mod:`fedsim.engine.vectorized`) take from this module:

- the loss: cross-entropy of the model's logits, with an optional per-sample weight mask
  for the padded batches of a cohort (:func:`cross_entropy`), plus every hook's
  ``loss_term`` (:func:`hook_loss`);
- the gradient transforms: every hook's ``grad_transform`` (:func:`transform_grads`);
- the update: :class:`SGD`, ``torch.optim.SGD``'s rule (weight decay, momentum whose first
  buffer is the gradient itself, no dampening or Nesterov) on dicts of tensors, stacked or
  not;
- the evaluation sums (:func:`eval_sums`): summed loss and hits of a batch of logits;
- :class:`HookTerms`: a client's hooks reduced to what the step needs (per-client state
  tensors a cohort stacks, pure term functions, a cap on the number of steps).

Torch only: no Flower, no messages. Hooks are read through the :class:`StepHook` protocol
(:class:`fedsim.client.hooks.ClientHook` implements it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.config import ClientConfig

Tensors = dict[str, torch.Tensor]


class StepHook(Protocol):
    """What the step reads of a client hook: its modes, per-client state, terms, step cap."""

    def before_train(self, model: nn.Module) -> None: ...

    def step_state(self, start: Mapping[str, torch.Tensor]) -> object | None: ...

    def max_steps(self) -> int | None: ...

    def loss_term(self, params: Mapping[str, torch.Tensor], state) -> torch.Tensor | None: ...

    def grad_transform(self, grads: dict[str, torch.Tensor], state
                       ) -> dict[str, torch.Tensor]: ...


# --------------------------------------------------------------------------- the optimizer


@dataclass(frozen=True)
class SGD:
    """``torch.optim.SGD``'s update (lr, momentum, weight decay; no dampening, no Nesterov)
    on dicts of tensors: one client's parameters, or a cohort's stacked along dim 0."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    @classmethod
    def of(cls, cfg: ClientConfig) -> SGD:
        return cls(cfg.lr, cfg.momentum, cfg.weight_decay)

    def update(self, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
               momentum: MutableMapping[str, torch.Tensor], in_place: bool = False) -> Tensors:
        """The parameters after one step on ``grads``.

        ``momentum`` holds the momentum buffers by name; a name without one starts with the
        gradient itself (torch's first step) and the new buffers are written back to it.
        ``in_place``: update ``params``' tensors themselves (a module's parameters, outside
        autograd) and the momentum buffers (the caller's own, as ``torch.optim.SGD``'s
        state), and return the parameters; else return new tensors and leave the buffers
        that came in untouched — differentiable where the inputs are (a simulated client
        whose update an attacker differentiates). The arithmetic is the same either way.
        """
        out = {}
        lr, mu, wd = self.lr, self.momentum, self.weight_decay
        with torch.no_grad() if in_place else contextlib.nullcontext():
            for name, d_p in grads.items():
                p = params[name]
                if wd:
                    d_p = d_p.add(p, alpha=wd)
                if mu:
                    buf = momentum.get(name)
                    if buf is None:
                        buf = momentum[name] = d_p.clone()
                    elif in_place:
                        buf.mul_(mu).add_(d_p)
                    else:
                        buf = momentum[name] = buf.mul(mu).add_(d_p)
                    d_p = buf
                out[name] = p.add_(d_p, alpha=-lr) if in_place else p.add(d_p, alpha=-lr)
        return out


# --------------------------------------------------------------------------- loss and metrics


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """The training loss of a batch: mean cross-entropy; with ``weight`` (0/1 per sample,
    a cohort's padded batch) the mean over the samples of weight 1."""
    if weight is None:
        return F.cross_entropy(logits, y)
    return (F.cross_entropy(logits, y, reduction="none") * weight).sum() / weight.sum()


def hits(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None
         ) -> torch.Tensor:
    """Correct predictions in a batch (only samples of weight > 0 with ``weight``)."""
    right = logits.argmax(-1) == y
    return (right if weight is None else right & (weight > 0)).sum(-1)


def eval_terms(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (cross-entropy in float64, correct) of ``logits`` ``(..., classes)``: the
    one definition of evaluation loss and accuracy."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                           reduction="none")
    return loss.view(y.shape).double(), logits.argmax(-1) == y


def eval_sums(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, hits) of :func:`eval_terms` over the last batch dimension
    (``logits``: ``(..., n, classes)``); ``mask`` (bool, ``(..., n)``) leaves padding out.
    For one client's batch or a stacked cohort's."""
    loss, right = eval_terms(logits, y)
    if mask is not None:
        loss, right = loss * mask, right & mask
    return loss.sum(-1), right.sum(-1)


@dataclass(frozen=True)
class TrainResult:
    """What a client reports of its local training."""

    loss: float  # mean training loss over the samples its steps saw
    accuracy: float  # training accuracy seen during the local steps
    num_examples: int
    steps: int


# --------------------------------------------------------------------------- hook terms


@dataclass(frozen=True)
class Trained:
    """What a client's local training did, as hooks see it after the steps (SCAFFOLD's
    control-variate update needs both)."""

    steps: int
    lr: float


class HookTerms:
    """A client's hooks reduced to what its local step needs.

    ``states[j]`` is hook ``j``'s per-client step state (``step_state``: tensors the cohort
    backend stacks over clients) or None where the hook adds nothing to the step; the loss
    terms and gradient transforms are the hooks' own methods, pure functions of the
    parameters and that state, so the cohort calls one client's bound methods on every
    client's stacked state under ``vmap``. ``max_steps``: the smallest cap a hook puts on
    the number of local steps (None: no cap). ``key`` groups clients whose steps have the
    same terms (the hooks' types, in order).
    """

    def __init__(self, hooks: Sequence[StepHook], start: Mapping[str, torch.Tensor]) -> None:
        self.hooks = list(hooks)
        self.states = [h.step_state(start) for h in self.hooks]
        active = [(h, s) for h, s in zip(self.hooks, self.states) if s is not None]
        self.active_hooks = [h for h, _ in active]
        self.active_states = [s for _, s in active]
        caps = [c for c in (h.max_steps() for h in self.hooks) if c is not None]
        self.max_steps = min(caps) if caps else None
        self.key = tuple(type(h) for h in self.active_hooks)

    def __bool__(self) -> bool:
        return bool(self.active_hooks)


#: a client without hooks: no terms, no cap
NO_TERMS = HookTerms((), {})


def hook_loss(hooks: Sequence[StepHook], params: Mapping[str, torch.Tensor],
              states: Sequence[object]) -> torch.Tensor | None:
    """The sum of the hooks' loss terms (None: no hook adds one)."""
    total = None
    for hook, state in zip(hooks, states):
        term = hook.loss_term(params, state)
        if term is not None:
            total = term if total is None else total + term
    return total


def transform_grads(hooks: Sequence[StepHook], grads: Tensors, states: Sequence[object]
                    ) -> Tensors:
    """The gradients after every hook's ``grad_transform``, in hook order."""
    for hook, state in zip(hooks, states):
        grads = hook.grad_transform(grads, state)
    return grads


def stack_states(states: Sequence[object]) -> object:
    """Per-client step states (tensors, or dicts/tuples of them) stacked along a new dim 0."""
    first = states[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(states))
    if isinstance(first, Mapping):
        return {k: stack_states([s[k] for s in states]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(stack_states([s[i] for s in states]) for i in range(len(first)))
    raise TypeError(f"a hook's step state must hold tensors, got {type(first).__name__}")


def select_state(state: object, sel) -> object:
    """Rows ``sel`` of a stacked step state."""
    if isinstance(state, torch.Tensor):
        return state[sel]
    if isinstance(state, Mapping):
        return {k: select_state(v, sel) for k, v in state.items()}
    return type(state)(select_state(v, sel) for v in state)


# --------------------------------------------------------------------------- modes


def mode_key(model: nn.Module) -> tuple[bool, ...]:
    """Every module's train/eval mode, in order: clients whose hooks leave the same modes
    after ``before_train`` can share one cohort call."""
    return tuple(m.training for m in model.modules())


def train_modes(model: nn.Module, hooks: Sequence[StepHook]) -> None:
    """``model.train()``, then each hook's ``before_train`` (mode changes such as frozen
    BN statistics)."""
    model.train()
    for hook in hooks:
        hook.before_train(model)


def set_modes(model: nn.Module, hooks: Sequence[StepHook]) -> tuple[bool, ...]:
    """:func:`train_modes`; returns the resulting :func:`mode_key` (for grouping a cohort)."""
    train_modes(model, hooks)
    return mode_key(model)


def apply_modes(model: nn.Module, key: tuple[bool, ...]) -> None:
    """Put every module of ``model`` in the mode ``key`` records (see :func:`mode_key`)."""
    for m, training in zip(model.modules(), key):
        m.training = training
