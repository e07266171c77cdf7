"""The in-process Grid speaks Flower's Grid protocol to an unmodified Flower strategy."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
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
