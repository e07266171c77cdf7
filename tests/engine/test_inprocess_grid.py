"""The in-process Grid speaks Flower's Grid protocol to an unmodified Flower strategy."""

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from fedsim.engine.inprocess import InProcessGrid


def echo_app(fail_on: set[int] = frozenset()) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = context.node_config["partition-id"]
        if pid in fail_on:
            raise RuntimeError("boom")
        calls = int(context.state.config_records.get("s", ConfigRecord({"n": 0}))["n"]) + 1
        context.state["s"] = ConfigRecord({"n": calls})
        arrays = msg.content.array_records["arrays"]
        new = ArrayRecord({"w": Array(arrays["w"].numpy() + pid)})
        metrics = MetricRecord({"num-examples": 1, "calls": calls})
        return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)

    return app


def test_fedavg_round_through_the_grid():
    grid = InProcessGrid(echo_app(), num_nodes=4)
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=4, min_available_nodes=4)
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(msgs))
    assert len(replies) == 4
    sent = {m.metadata.message_id for m in msgs}
    assert {r.metadata.reply_to_message_id for r in replies} == sent
    agg, metrics = strategy.aggregate_train(1, replies)
    assert np.allclose(agg["w"].numpy(), [1.5, 1.5])  # mean of partition ids 0..3
    assert metrics["calls"] == 1.0


def test_context_state_persists_per_node():
    grid = InProcessGrid(echo_app(), num_nodes=2)
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
    arrays = ArrayRecord({"w": Array(np.zeros(1, dtype=np.float32))})
    for rnd in (1, 2, 3):
        replies = grid.send_and_receive(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
    assert all(r.content.metric_records["metrics"]["calls"] == 3 for r in replies)


def test_client_exception_becomes_error_reply_not_a_crash():
    grid = InProcessGrid(echo_app(fail_on={1}), num_nodes=3)
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=3, min_available_nodes=3)
    arrays = ArrayRecord({"w": Array(np.zeros(1, dtype=np.float32))})
    replies = list(grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord(), grid)))
    errors = [r for r in replies if r.has_error()]
    assert len(errors) == 1 and "RuntimeError: boom" in errors[0].error.reason
    agg, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(agg["w"].numpy(), [1.0])  # mean of the two healthy nodes (0 and 2)


def test_context_state_survives_spilling_to_disk(tmp_path):
    """With no memory budget every node's state goes to disk between rounds and comes back."""
    from fedsim.engine.store import ClientStateStore

    store = ClientStateStore(memory_budget=0, spill_dir=tmp_path)
    grid = InProcessGrid(echo_app(), num_nodes=3, state_store=store)
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=3, min_available_nodes=3)
    arrays = ArrayRecord({"w": Array(np.zeros(1, dtype=np.float32))})
    for rnd in (1, 2, 3, 4):
        replies = grid.send_and_receive(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
    assert all(r.content.metric_records["metrics"]["calls"] == 4 for r in replies)
    assert store.memory_bytes == 0 and len(store) == 3 and store.loads == 9
    assert set(grid.export_states()) == {1, 2, 3}
    grid.close()
    assert not any(tmp_path.iterdir())


def test_failing_client_keeps_its_previous_state():
    grid = InProcessGrid(echo_app(fail_on={1}), num_nodes=2)
    grid.state_store.put(2, RecordDict({"s": ConfigRecord({"n": 41})}))
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
    arrays = ArrayRecord({"w": Array(np.zeros(1, dtype=np.float32))})
    grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    assert grid.state_store.get(2)["s"]["n"] == 41  # node 2 (partition 1) raised: unchanged
    assert grid.state_store.get(1)["s"]["n"] == 1  # the healthy node saved its state


def test_states_export_and_import_through_the_store():
    grid = InProcessGrid(echo_app(), num_nodes=2, state_store=None)
    grid.import_states({2: RecordDict({"s": ConfigRecord({"n": 5})})})
    assert {k: v["s"]["n"] for k, v in grid.export_states().items()} == {2: 5}
    with pytest.raises(ValueError, match="unknown node 3"):
        grid.import_states({3: RecordDict({"s": ConfigRecord({"n": 1})})})


def test_frozen_gc_leaves_pre_run_objects_out_of_collections_and_restores():
    import gc

    from fedsim.engine import frozen_gc

    before = gc.get_freeze_count()
    with frozen_gc():
        assert gc.get_freeze_count() > before  # the objects that existed are frozen
        cycle: list = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1  # garbage made during the run is still collected
    assert gc.get_freeze_count() == 0


def test_a_cohort_is_answered_from_stored_state_bytes():
    """answer_cohort (what the grid and a Ray cohort actor run): each client's Context gets
    its node ids and decoded state; a successful reply's new state comes back as the
    store's bytes (b"": none), an error reply's as None, and a handler that raises answers
    every message with its reason."""
    from fedsim.engine.inprocess import answer_cohort
    from fedsim.engine.store import decode_state, encode_state

    grid = InProcessGrid(echo_app(), num_nodes=3)
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=3, min_available_nodes=3)
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    seen = []

    def handler(batch, contexts):
        out = []
        for msg, ctx in zip(batch, contexts):
            seen.append((ctx.node_id, dict(ctx.node_config), dict(ctx.run_config),
                         ctx.state.config_records["s"]["n"] if "s" in ctx.state else None))
            if ctx.node_id == 3:
                out.append(Message(Error(code=1, reason="no"), reply_to=msg))
                continue
            if ctx.node_id == 1:
                ctx.state["s"] = ConfigRecord({"n": 7})
            else:
                del ctx.state["s"]  # a client that drops its state
            out.append(Message(RecordDict({"metrics": MetricRecord({"x": 1})}), reply_to=msg))
        return out

    nodes = [m.metadata.dst_node_id for m in msgs]
    states = [None if n == 1 else encode_state(RecordDict({"s": ConfigRecord({"n": n})}))
              for n in nodes]
    answers = answer_cohort(handler, msgs, nodes, states, 5, 3, {"k": 1})
    assert seen == [(n, {"partition-id": n - 1, "num-partitions": 3}, {"k": 1},
                     None if n == 1 else n) for n in nodes]
    by_node = dict(zip(nodes, answers))
    assert decode_state(by_node[1][1])["s"]["n"] == 7 and by_node[2][1] == b""
    assert by_node[3][0].has_error() and by_node[3][1] is None

    def broken(batch, contexts):
        raise RuntimeError("cohort lost")

    failed = answer_cohort(broken, msgs, nodes, states, 5, 3, {})
    assert all(r.has_error() and "cohort lost" in r.error.reason and s is None
               for r, s in failed)
