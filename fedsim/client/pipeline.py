"""A client's round as one pipeline: prepare → step loop → reply.

1. :func:`prepare` decodes a train message (:mod:`fedsim.client.messages`), assembles the
   arrays the client starts from (the received global arrays, decoded once and shared,
   with what its hooks lay over them: :class:`~fedsim.client.step.GlobalArrays`,
   :func:`client_start`), its
   hooks' step terms (:class:`~fedsim.models.sgd_step.HookTerms`), its local data, and its
   batch plan and gradient rule: minibatches and plain SGD
   (:class:`~fedsim.models.local_sgd.FixedBatches`,
   :data:`~fedsim.models.local_sgd.BATCH_MEAN`), or under ``[client.dp]`` Poisson batches
   with the client's noise and gradient canaries and DP-SGD
   (:class:`~fedsim.models.dp_sgd.PoissonBatches`, :class:`~fedsim.models.dp_sgd.DPSGD`).
2. The step loop (:func:`fedsim.models.local_sgd.local_steps`) runs on a backend: one
   client on the working module (:func:`train_one`, the ClientApp's ``handle_train``), or
   many at once under ``vmap`` (:class:`fedsim.engine.vectorized.CohortTrainer`).
3. :func:`upload` runs the hooks' ``on_reply`` on the trained arrays and :func:`reply`
   answers the message, with the client's DP-SGD accounting (its steps so far
   in ``Context.state``, its ε).

Both ways of running clients go through these functions, so a client's round is the same
whichever backend computes it; the inversion attack simulates a client on the same loop
(:func:`fedsim.privacy.inversion.simulate_update`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from torch import nn

from fedsim.arrays import load_record
from fedsim.client import dpsgd
from fedsim.client.bn_moments import upload_exact_moments
from fedsim.client.hooks import ClientHook, apply_received
from fedsim.client.messages import ClientRequest, decode, train_reply, wants_bn_moments
from fedsim.client.runtime import ClientRuntime, ClientSettings
from fedsim.client.step import ClientArrays, GlobalArrays
from fedsim.client.train import train_on_module
from fedsim.models.dp_sgd import DPSGD
from fedsim.models.local_sgd import (
    BATCH_MEAN,
    BatchPlan,
    FixedBatches,
    GradientRule,
    plan_batches,
)
from fedsim.models.sgd_step import NO_TERMS, HookTerms, TrainResult
from fedsim.records import get_record
from fedsim.rng import torch_generator

Local = Callable[[], tuple[torch.Tensor, torch.Tensor]]

# --------------------------------------------------------------------------- start arrays


def client_start(model: nn.Module, params: dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor], hooks: Sequence[ClientHook],
                 local_train: Local | None = None, defer_one: bool = False) -> ClientArrays:
    """The hooks' ``on_receive`` on a client that starts from the shared ``params`` and
    ``buffers`` (not copied: overrides stay in the returned arrays' ``overrides``): what
    every client starts from, training or evaluated, one at a time or in a cohort. A cold
    start they ask for is served eagerly (:func:`serve_eagerly`); ``defer_one``: a single
    one is left in ``estimates`` for a cohort evaluation to serve with the others'."""
    arrays = ClientArrays({**params, **buffers})
    for hook in hooks:
        hook.on_receive(model, arrays)
    if len(arrays.estimates) > (1 if defer_one else 0):  # in a row: each sees the last
        serve_eagerly(model, params, buffers, arrays, local_train)
    return arrays


def serve_eagerly(model: nn.Module, params: dict[str, torch.Tensor],
                  buffers: dict[str, torch.Tensor], arrays: ClientArrays,
                  local_train: Local | None) -> None:
    """Apply ``arrays`` (overrides, then statistics re-estimations) on ``model`` as one
    client at a time would, and keep the result as the client's overrides."""
    load_record(model, {**params, **buffers})
    apply_received(model, arrays, local_train)
    arrays.overrides = {n: t.detach().clone() for n, t in model.state_dict().items()}
    arrays.estimates = []


def load_start(model: nn.Module, start: ClientArrays,
               targets: Mapping[str, torch.Tensor] | None = None) -> None:
    """Load a client's start arrays (:func:`client_start`) into ``model``: where one client
    at a time trains or is evaluated."""
    load_record(model, start.base, targets)
    if start.overrides:
        apply_received(model, start)


# --------------------------------------------------------------------------- prepare


@dataclass
class ClientRound:
    """A train message prepared for the step loop (:func:`prepare`)."""

    req: ClientRequest
    context: Context
    start: ClientArrays  # what it starts from: the received arrays and its hooks' overrides
    params: dict[str, torch.Tensor]  # the shared received parameters (start.base's)
    buffers: dict[str, torch.Tensor]
    terms: HookTerms
    x: torch.Tensor  # its local training data, on the run's device
    y: torch.Tensor
    plan: BatchPlan
    rule: GradientRule
    noise_multiplier: float | None = None  # DP-SGD's σ (None: plain SGD)

    @property
    def hooks(self) -> list[ClientHook]:
        return self.req.hooks


def evaluate_start(model: nn.Module, global_arrays: GlobalArrays, record, hooks:
                   Sequence[ClientHook], local_train: Local) -> None:
    """Load into ``model`` what a client is evaluated with: the received ``record`` with
    its hooks' arrays over it, a cold start served (one client at a time: the ClientApp's
    evaluation, the server's holdout clients)."""
    params, buffers = global_arrays(record)
    load_start(model, client_start(model, params, buffers, hooks, local_train))


def prepare(rt: ClientRuntime, msg: Message, context: Context, model: nn.Module,
            global_arrays: GlobalArrays) -> ClientRound:
    """Decode ``msg`` and prepare client ``context``'s round (see the module docstring).
    ``model`` is the backend's template: the hooks read its structure, never its values."""
    settings = rt.settings
    cid = rt.client_id(context)
    req = decode(msg, context, settings, cid)
    params, buffers = global_arrays(req.arrays)
    start = client_start(model, params, buffers, req.hooks,
                         lambda: rt.data.client_train(cid))
    terms = HookTerms(req.hooks, {n: start[n] for n in params}) if req.hooks else NO_TERMS
    x, y = rt.client_train(cid)  # on the run's device, kept there for the run
    gen = torch_generator(settings.seed, "client-train", req.server_round, cid)
    cfg = settings.client
    if not cfg.dp.enabled:
        plan = FixedBatches(plan_batches(len(x), cfg, gen, settings.batch_statistics))
        return ClientRound(req, context, start, params, buffers, terms, x, y,
                           plan.capped(terms.max_steps), BATCH_MEAN)
    if settings.batch_statistics:  # checked before training too (fedsim.validate)
        raise ValueError(dpsgd.BATCH_NORM_REFUSAL.format(norm=settings.norm))
    sigma = dpsgd.noise_multiplier_for(cfg, settings.rounds, len(x))
    plan = dpsgd.poisson_plan(len(x), cfg, sigma, gen, rt.canaries(cid), terms.max_steps)
    return ClientRound(req, context, start, params, buffers, terms, x, y, plan,
                       DPSGD(cfg.dp.max_grad_norm), sigma)


# --------------------------------------------------------------------------- reply


def upload(cr: ClientRound, model: nn.Module, trained: dict[str, torch.Tensor | np.ndarray]
           ) -> dict[str, torch.Tensor | np.ndarray]:
    """The arrays the client uploads: its ``trained`` arrays after the hooks' ``on_reply``
    (``model`` for their structure; ``after_train`` ran with the steps)."""
    arrays = trained
    for hook in cr.hooks:
        arrays = hook.on_reply(model, arrays)
    return arrays


def reply(cr: ClientRound, arrays: Mapping[str, torch.Tensor | np.ndarray],
          result: TrainResult, settings: ClientSettings, bn_counts: Mapping[str, int] | None = None
          ) -> Message:
    """The train reply; under DP-SGD the client's steps so far (its ``Context.state``) grow
    by this round's and its ε so far joins the metrics."""
    metrics = None
    if cr.noise_multiplier is not None:
        cfg = settings.client
        state = get_record(cr.context.state, dpsgd.STATE_KEY, ConfigRecord)
        steps = (int(state["steps"]) if state is not None else 0) + result.steps
        cr.context.state[dpsgd.STATE_KEY] = ConfigRecord({"steps": steps})
        q = cr.plan.rate  # type: ignore[attr-defined]
        metrics = {
            dpsgd.EPSILON_METRIC: dpsgd.client_epsilon(cr.noise_multiplier, q, steps,
                                                       cfg.dp.delta),
            dpsgd.NOISE_METRIC: float(cr.noise_multiplier),
            dpsgd.RATE_METRIC: float(q),
            dpsgd.STEPS_METRIC: steps,
        }
    return train_reply(cr.req, arrays, result, metrics, bn_counts)


# --------------------------------------------------------------------------- one client


def train_one(rt: ClientRuntime, msg: Message, context: Context) -> Message:
    """A train message answered one client at a time, on the working module (the ClientApp's
    ``handle_train``): prepare, the step loop on the module
    (:func:`fedsim.client.train.train_on_module`), reply."""
    model = rt.model
    cr = prepare(rt, msg, context, model, rt.global_arrays)
    state = model.state_dict(keep_vars=True)  # the module's own tensors, updated in place
    load_start(model, cr.start, state)
    result = train_on_module(model, cr.x, cr.y, rt.settings.client, cr.plan, cr.rule,
                             cr.hooks, cr.terms)
    # training updates the module's tensors in place, so ``state`` holds the trained arrays;
    # hooks may restructure the module (or need detached tensors): a fresh state dict then
    arrays = upload(cr, model, model.state_dict() if cr.hooks else state)
    counts = None
    if wants_bn_moments(cr.req):  # server.bn_statistics = "pooled": exact moments go up
        arrays = dict(arrays)
        counts = upload_exact_moments(model, cr.x, arrays)
    return reply(cr, arrays, result, rt.settings, counts)
