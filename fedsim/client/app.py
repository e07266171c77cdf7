"""The fedsim ClientApp (Flower Message API): local training and local evaluation.

``make_client_app(runtime)`` builds an app bound to a run's client runtime
(:class:`fedsim.client.runtime.ClientRuntime`, made once per run from its
:class:`fedsim.context.RunContext`; in-process and Ray engines); the module-level ``app``
finds the run named by the run config (``flwr run .`` on Flower's Deployment Engine).

The handlers run one client at a time: messages are decoded and answered by
:mod:`fedsim.client.messages`, local training is the sequential backend of the client
computation (:mod:`fedsim.client.step`, :func:`fedsim.client.train.train_local`), the same
definitions the vectorized cohorts of :mod:`fedsim.engine.vectorized` run. They read the
run's client settings (:class:`fedsim.client.runtime.ClientSettings`), not the Scenario.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

import fedsim.plugins  # noqa: F401  strategies and client hooks register (own process)
from fedsim.arrays import load_record
from fedsim.client import dpsgd
from fedsim.client.bn_moments import layer_moments, upload_exact_moments
from fedsim.client.hooks import receive
from fedsim.client.messages import (  # messages imports failures: the "crash" hook exists
    BN_MOMENTS,
    bn_layer_asked,
    decode,
    error_reply,
    evaluate_reply,
    moments_reply,
    train_reply,
    wants_bn_moments,
)
from fedsim.client.runtime import ClientRuntime, ClientSettings, shared_runtime
from fedsim.client.train import evaluate, train_local
from fedsim.config import Scenario, load_scenario
from fedsim.records import get_record, require_record
from fedsim.rng import torch_generator


def handle_train(msg: Message, context: Context, rt: ClientRuntime) -> Message:
    """Decode the message, apply the hooks to the received arrays, train locally (the
    sequential backend of :mod:`fedsim.client.step`), reply with the update."""
    cfg = rt.settings
    req = decode(msg, context, cfg, rt.client_id(context))
    model = rt.model
    state = model.state_dict(keep_vars=True)  # the module's own tensors, updated in place
    load_record(model, req.arrays, state)
    if req.hooks:  # (no hook: nothing to lay over the received arrays)
        receive(model, req.hooks)
    x, y = rt.client_train(req.client_id)  # on the run's device, kept there for the run
    gen = torch_generator(cfg.seed, "client-train", req.server_round, req.client_id)
    dp_metrics = {}
    if cfg.client.dp.enabled:
        result, dp_metrics = _train_dpsgd(cfg, model, x, y, gen, req.hooks, context,
                                          rt.canaries(req.client_id))
    else:
        result = train_local(model, x, y, cfg.client, gen, req.hooks,
                             drop_singleton=cfg.batch_statistics)
    # training updates the module's tensors in place, so ``state`` holds the trained arrays;
    # hooks may restructure the module (or need detached tensors): a fresh state dict then
    arrays = model.state_dict() if req.hooks else state
    for hook in req.hooks:
        arrays = hook.on_reply(model, arrays)
    counts = None
    if wants_bn_moments(req):  # server.bn_statistics = "pooled": exact moments go up
        arrays = dict(arrays)
        counts = upload_exact_moments(model, x, arrays)
    return train_reply(req, arrays, result, dp_metrics, counts)


def _train_dpsgd(settings: ClientSettings, model, x, y, gen, hooks, context: Context,
                 canaries=None):
    """DP-SGD for one round (:mod:`fedsim.client.dpsgd`), with the client's gradient
    canaries if an audit inserts some; the client's steps so far live in its
    ``Context.state``. Returns the result and the reply's DP metrics (ε so far)."""
    cfg = settings.client
    if settings.batch_statistics:  # checked before training too (validate)
        raise ValueError(dpsgd.BATCH_NORM_REFUSAL.format(norm=settings.norm))
    sigma = dpsgd.noise_multiplier_for(cfg, settings.rounds, len(x))
    result = dpsgd.train_dpsgd(model, x, y, cfg, sigma, gen, hooks, canaries)
    state = get_record(context.state, dpsgd.STATE_KEY, ConfigRecord)
    steps = int(state["steps"]) if state is not None else 0
    steps += result.steps
    context.state[dpsgd.STATE_KEY] = ConfigRecord({"steps": steps})
    q = dpsgd.plan(len(x), cfg).sampling_rate
    return result, {
        dpsgd.EPSILON_METRIC: dpsgd.client_epsilon(sigma, q, steps, cfg.dp.delta),
        dpsgd.NOISE_METRIC: float(sigma),
        dpsgd.RATE_METRIC: float(q),
        dpsgd.STEPS_METRIC: steps,
    }


def handle_evaluate(msg: Message, context: Context, rt: ClientRuntime) -> Message:
    """Evaluate the received global model (with what the hooks lay over it, e.g. local
    layers) on the local test split."""
    cid = rt.client_id(context)

    def local_train():
        return rt.client_train(cid)  # on the device, copied once per run

    req = decode(msg, context, rt.settings, cid, local_train)
    load_record(rt.model, req.arrays)
    receive(rt.model, req.hooks, local_train)
    x, y = rt.client_test(cid)
    return evaluate_reply(req, *evaluate(rt.model, x, y, bn_eval=rt.settings.bn_eval))


def handle_bn_moments(msg: Message, context: Context, rt: ClientRuntime) -> Message:
    """A recalibration query (``server.bn_statistics = "recalibrate"``): the moments of one BN
    layer's input under the global arrays sent, over the local training data (forward passes
    only, the global model without the client's hooks)."""
    cid = rt.client_id(context)
    load_record(rt.model, require_record(msg.content, "arrays", ArrayRecord))
    x, _ = rt.client_train(cid)
    return moments_reply(msg, cid, *layer_moments(rt.model, bn_layer_asked(msg), x))


def handle_query(msg: Message, context: Context, rt: ClientRuntime) -> Message:
    """Tell the server which fedsim client this node is (for engine-independent sampling)."""
    cid = rt.client_id(context)
    return Message(RecordDict({"client": ConfigRecord({"client-id": cid})}), reply_to=msg)


def _guarded(handler: Callable[..., Message], get_runtime: Callable[[Context], ClientRuntime]
             ) -> Callable[[Message, Context], Message]:
    """Run a handler; an exception becomes an error reply, so a failing client never kills or
    hangs a run on any engine. Train replies also report whether the node keeps state."""

    def run(msg: Message, context: Context) -> Message:
        try:
            reply = handler(msg, context, get_runtime(context))
        except Exception as exc:  # reported to the server and recorded per round
            try:  # name the client, not the engine's (random) node id
                cid = get_runtime(context).client_id(context)
            except Exception:
                cid = None
            return error_reply(msg, exc, cid)
        client = get_record(reply.content, "client", ConfigRecord) if reply.has_content() \
            else None
        if client is not None and handler is handle_train:
            client["state-records"] = len(context.state)  # checkpoints need to know (Ray)
        return reply

    return run


def _register(app: ClientApp, get_runtime: Callable[[Context], ClientRuntime]) -> ClientApp:
    app.train()(_guarded(handle_train, get_runtime))
    app.evaluate()(_guarded(handle_evaluate, get_runtime))
    app.query()(_guarded(handle_query, get_runtime))
    app.query(BN_MOMENTS.partition(".")[2])(_guarded(handle_bn_moments, get_runtime))
    return app


def make_client_app(runtime: ClientRuntime) -> ClientApp:
    """A ClientApp bound to a run's client runtime (``ClientRuntime.for_run(run)``).

    On Ray the app pickles with the runtime, which travels as its run's scenario and is
    built once per worker process (:func:`fedsim.client.runtime.shared_runtime`).
    """
    return _register(ClientApp(), lambda _context: runtime)


def scenario_from_context(context: Context) -> Scenario:
    """The scenario named by the run config (``scenario`` path, optional ``set`` a=b;c=d)."""
    path = str(context.run_config.get("scenario", "scenarios/quickstart.toml"))
    overrides = str(context.run_config.get("set", ""))
    return load_scenario(Path(path), [o for o in overrides.split(";") if o.strip()])


app = _register(ClientApp(), lambda context: shared_runtime(scenario_from_context(context)))
