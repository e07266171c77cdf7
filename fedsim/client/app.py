"""The fedsim ClientApp (Flower Message API): local training and local evaluation.

``make_client_app(runtime)`` builds an app bound to a run's client runtime
(:class:`fedsim.client.runtime.ClientRuntime`, made once per run from its
:class:`fedsim.context.RunContext`; in-process and Ray engines); the module-level ``app``
finds the run named by the run config (``flwr run .`` on Flower's Deployment Engine).

The handlers run one client at a time: a train message goes through the client pipeline
(:mod:`fedsim.client.pipeline`: prepare, the step loop on the working module, reply), the
same pipeline the vectorized cohorts of :mod:`fedsim.engine.vectorized` run; messages are
decoded and answered by :mod:`fedsim.client.messages`. They read the run's client settings
(:class:`fedsim.client.runtime.ClientSettings`), not the Scenario.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

import fedsim.plugins  # noqa: F401  strategies and client hooks register (own process)
from fedsim.arrays import load_record
from fedsim.client.bn_moments import layer_moments
from fedsim.client.messages import (  # messages imports failures: the "crash" hook exists
    BN_MOMENTS,
    bn_layer_asked,
    decode,
    error_reply,
    evaluate_reply,
    moments_reply,
)
from fedsim.client.pipeline import evaluate_start, train_one
from fedsim.client.runtime import ClientRuntime, shared_runtime
from fedsim.client.train import evaluate
from fedsim.config import Scenario, load_scenario
from fedsim.records import get_record, require_record


def handle_train(msg: Message, context: Context, rt: ClientRuntime) -> Message:
    """One client's round (:func:`fedsim.client.pipeline.train_one`): prepare, the step loop
    on the working module, reply with the update."""
    return train_one(rt, msg, context)


def handle_evaluate(msg: Message, context: Context, rt: ClientRuntime) -> Message:
    """Evaluate the received global model (with what the hooks lay over it, e.g. local
    layers: :func:`fedsim.client.pipeline.evaluate_start`) on the local test split."""
    cid = rt.client_id(context)

    def local_train():
        return rt.client_train(cid)  # on the device, copied once per run

    req = decode(msg, context, rt.settings, cid, local_train)
    evaluate_start(rt.model, rt.global_arrays, req.arrays, req.hooks, local_train)
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
