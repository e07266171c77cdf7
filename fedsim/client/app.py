"""The fedsim ClientApp (Flower Message API): local training and local evaluation.

``make_client_app(scenario)`` builds an app bound to a scenario (in-process and Ray
engines); the module-level ``app`` reads the scenario path from the run config
(``flwr run .`` on Flower's Deployment Engine).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import fedsim.plugins  # noqa: F401  strategies and client hooks register (own process)
from fedsim.arrays import load_record, state_to_record
from fedsim.client import dpsgd
from fedsim.client.compress import upload_bytes
from fedsim.client.failures import error_reply  # also registers the "crash" client hook
from fedsim.client.hooks import HookContext, hooks_for
from fedsim.client.runtime import client_runtime
from fedsim.client.train import evaluate, train_local
from fedsim.config import Scenario, load_scenario
from fedsim.data.federated import FederatedData
from fedsim.models.norm import uses_batch_statistics
from fedsim.records import get_record, require_record
from fedsim.rng import torch_generator
from fedsim.server.strategies import strategy_class


@functools.lru_cache(maxsize=16)
def import_strategy(name: str) -> None:
    """Import the scenario's strategy here too, so client hooks its module registers exist."""
    strategy_class(name)


def handle_train(msg: Message, context: Context, scenario: Scenario,
                 data: FederatedData | None = None) -> Message:
    """Load the global arrays, run the requested hooks and local SGD, reply with the update."""
    rt = client_runtime(scenario, data)
    cid = rt.client_id(context)
    model = rt.model
    config = get_record(msg.content, "config", ConfigRecord) or ConfigRecord()
    load_record(model, require_record(msg.content, "arrays", ArrayRecord))
    import_strategy(scenario.server.strategy)
    hooks = hooks_for(HookContext(cid, config, context.state, message=msg.content,
                                  client=scenario.client, seed=scenario.seed))
    for hook in hooks:
        hook.on_receive(model)
    x, y = rt.data.client_train(cid)
    rnd = int(config.get("server-round", 0))
    gen = torch_generator(scenario.seed, "client-train", rnd, cid)
    dp_metrics = {}
    if scenario.client.dp.enabled:
        result, dp_metrics = _train_dpsgd(scenario, model, x.to(rt.device), y.to(rt.device),
                                          gen, hooks, context)
    else:
        result = train_local(
            model,
            x.to(rt.device),
            y.to(rt.device),
            scenario.client,
            gen,
            hooks,
            drop_singleton=uses_batch_statistics(scenario.model.norm),
        )
    arrays = model.state_dict()
    for hook in hooks:
        arrays = hook.on_reply(model, arrays)
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train_loss": result.loss,
            "train_accuracy": result.accuracy,
            **dp_metrics,
        }
    )
    content = RecordDict(
        {
            "arrays": state_to_record(arrays),
            "metrics": metrics,
            "client": ConfigRecord({"client-id": cid, "steps": result.steps,
                                    "upload-bytes": upload_bytes(arrays, hooks)}),
        }
    )
    return Message(content, reply_to=msg)


def _train_dpsgd(scenario: Scenario, model, x, y, gen, hooks, context: Context):
    """DP-SGD for one round (:mod:`fedsim.client.dpsgd`); the client's steps so far live in
    its ``Context.state``. Returns the result and the reply's DP metrics (ε so far)."""
    cfg = scenario.client
    if uses_batch_statistics(scenario.model.norm):  # checked before training too (validate)
        raise ValueError(dpsgd.BATCH_NORM_REFUSAL.format(norm=scenario.model.norm))
    sigma = dpsgd.noise_multiplier_for(cfg, scenario.server.rounds, len(x))
    result = dpsgd.train_dpsgd(model, x, y, cfg, sigma, gen, hooks)
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


def handle_evaluate(msg: Message, context: Context, scenario: Scenario,
                    data: FederatedData | None = None) -> Message:
    """Evaluate the received global model (plus any local layers) on the local test split."""
    rt = client_runtime(scenario, data)
    cid = rt.client_id(context)
    config = get_record(msg.content, "config", ConfigRecord) or ConfigRecord()
    load_record(rt.model, require_record(msg.content, "arrays", ArrayRecord))
    import_strategy(scenario.server.strategy)
    ctx = HookContext(cid, config, context.state, message=msg.content, mode="evaluate",
                      local_train=lambda: rt.data.client_train(cid))
    for hook in hooks_for(ctx):
        hook.on_receive(rt.model)
    x, y = rt.data.client_test(cid)
    loss, acc, n = evaluate(rt.model, x.to(rt.device), y.to(rt.device))
    metrics = MetricRecord({"num-examples": n, "eval_loss": loss, "eval_accuracy": acc})
    content = RecordDict({"metrics": metrics, "client": ConfigRecord({"client-id": cid})})
    return Message(content, reply_to=msg)


def handle_query(msg: Message, context: Context, scenario: Scenario,
                 data: FederatedData | None = None) -> Message:
    """Tell the server which fedsim client this node is (for engine-independent sampling)."""
    cid = client_runtime(scenario, data).client_id(context)
    return Message(RecordDict({"client": ConfigRecord({"client-id": cid})}), reply_to=msg)


def _guarded(handler: Callable[..., Message], get_scenario: Callable[[Context], Scenario],
             data: FederatedData | None = None) -> Callable[[Message, Context], Message]:
    """Run a handler; an exception becomes an error reply, so a failing client never kills or
    hangs a run on any engine. Train replies also report whether the node keeps state."""

    def run(msg: Message, context: Context) -> Message:
        try:
            reply = handler(msg, context, get_scenario(context), data)
        except Exception as exc:  # reported to the server and recorded per round
            try:  # name the client, not the engine's (random) node id
                cid = client_runtime(get_scenario(context)).client_id(context)
            except Exception:
                cid = None
            return error_reply(msg, exc, cid)
        client = get_record(reply.content, "client", ConfigRecord) if reply.has_content() \
            else None
        if client is not None and handler is handle_train:
            client["state-records"] = len(context.state)  # checkpoints need to know (Ray)
        return reply

    return run


def _register(app: ClientApp, get_scenario: Callable[[Context], Scenario],
              data: FederatedData | None = None) -> ClientApp:
    app.train()(_guarded(handle_train, get_scenario, data))
    app.evaluate()(_guarded(handle_evaluate, get_scenario, data))
    app.query()(_guarded(handle_query, get_scenario, data))
    return app


def make_client_app(scenario: Scenario, data: FederatedData | None = None) -> ClientApp:
    """A ClientApp bound to ``scenario`` (pickles to Ray workers with it).

    ``data`` overrides the clients' data (same client ids), e.g. for shadow federations.
    """
    return _register(ClientApp(), lambda _context: scenario, data)


@functools.lru_cache(maxsize=8)
def _scenario_from_run_config(path: str, overrides: str) -> Scenario:
    return load_scenario(Path(path), [o for o in overrides.split(";") if o.strip()])


def scenario_from_context(context: Context) -> Scenario:
    """The scenario named by the run config (``scenario`` path, optional ``set`` a=b;c=d)."""
    path = str(context.run_config.get("scenario", "scenarios/quickstart.toml"))
    return _scenario_from_run_config(path, str(context.run_config.get("set", "")))


app = _register(ClientApp(), scenario_from_context)
