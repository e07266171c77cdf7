"""ClientOrderedGrid: how it learns which node is which client, and how it polls."""

import random

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

import fedsim
import fedsim.engine.ordered as ordered
from fedsim import compat
from fedsim.engine.inprocess import InProcessGrid, NodeClients
from fedsim.engine.ordered import ClientOrderedGrid


def _query_app(client_of_partition, seen):
    """A ClientApp answering queries with ``client_of_partition[partition-id]``; every message
    type it receives is appended to ``seen``."""
    app = ClientApp()

    @app.query()
    def answer(msg, context):
        seen.append(msg.metadata.message_type)
        cid = client_of_partition[context.node_config["partition-id"]]
        return Message(RecordDict({"client": ConfigRecord({"client-id": cid})}), reply_to=msg)

    return app


class RandomIdGrid:
    """A base grid with random node ids and no node → client mapping, as Ray's and the
    Deployment Engine's: ClientOrderedGrid has to ask each node."""

    def __init__(self, client_of_node: dict[int, int]) -> None:
        self.client_of_node = client_of_node
        self.queried: list[int] = []

    def get_node_ids(self):
        return list(self.client_of_node)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            assert m.metadata.message_type == MessageType.QUERY
            self.queried.append(m.metadata.dst_node_id)
            cid = self.client_of_node[m.metadata.dst_node_id]
            out.append(Message(RecordDict({"client": ConfigRecord({"client-id": cid})}),
                               reply_to=m))
        return out


def test_a_grid_without_a_mapping_is_asked_once_per_node():
    with compat.task_identity_restored():
        compat.set_task_identity(1)
        base = RandomIdGrid({907: 5, 13: 2, 450: 0, 77: 9})
        grid = ClientOrderedGrid(base, expected_nodes=4)
        assert list(grid.get_node_ids()) == [450, 13, 907, 77]  # by client id, not node id
        assert sorted(base.queried) == [13, 77, 450, 907]  # one query each
        assert [grid.client_id(n) for n in (907, 13, 450, 77, 1)] == [5, 2, 0, 9, None]
        assert list(grid.get_node_ids()) == [450, 13, 907, 77]
        assert len(base.queried) == 4  # asked once, not per call


def test_an_inprocess_grid_without_client_ids_is_still_queried():
    seen = []
    with compat.task_identity_restored():
        grid = ClientOrderedGrid(InProcessGrid(_query_app([4, 1, 3], seen), 3), 3)
        assert list(grid.get_node_ids()) == [2, 3, 1]
        assert grid.client_id(1) == 4
    assert seen == [MessageType.QUERY] * 3


def test_an_inprocess_grid_with_client_ids_sends_no_query():
    seen = []
    with compat.task_identity_restored():
        base = InProcessGrid(_query_app([0, 2, 3, 5], seen), 4, client_ids=(0, 2, 3, 5))
        grid = ClientOrderedGrid(base, 4)
        assert list(grid.get_node_ids()) == [1, 2, 3, 4]
        assert [grid.client_id(n) for n in (1, 2, 3, 4, 5, 0)] == [0, 2, 3, 5, None, None]
        unordered = ClientOrderedGrid(InProcessGrid(_query_app([], seen), 3,
                                                    client_ids=[7, 1, 4]), 3)
        assert list(unordered.get_node_ids()) == [2, 3, 1]
    assert seen == []


def test_the_mapping_must_cover_the_federation():
    with compat.task_identity_restored():
        with pytest.raises(ValueError, match="error: 2 client ids for 3 nodes"):
            InProcessGrid(ClientApp(), 3, client_ids=[0, 1])
        base = InProcessGrid(ClientApp(), 3, client_ids=[0, 1, 2])
        with pytest.raises(RuntimeError, match="knows 3 client nodes, the federation has 4"):
            ClientOrderedGrid(base, 4).get_node_ids()


def test_node_clients_reads_the_sequence():
    m = NodeClients((3, 8, 9))
    assert dict(m) == {1: 3, 2: 8, 3: 9}
    assert list(m.values()) == [3, 8, 9] and len(m) == 3
    for bad in (0, 4, "1", 1.0):
        assert bad not in m
        with pytest.raises(KeyError):
            m[bad]


def test_inprocess_get_node_ids_does_not_list_the_population():
    grid = InProcessGrid(ClientApp(), 1_000_000)
    assert grid.get_node_ids() == range(1, 1_000_001)


def _tiny(out, extra=()):
    return fedsim.run("scenarios/quickstart.toml",
                      ["server.rounds=2", "partition.num_clients=8", "server.clients_per_round=3",
                       "partition.holdout_clients=0.25", "client.epochs=1", *extra], out=out)


def _rounds(result):
    import json

    lines = (result.path / "rounds.jsonl").read_text().splitlines()
    return [json.loads(line).get("clients") for line in lines]


def test_an_inprocess_run_sends_no_query_and_samples_as_with_queries(tmp_path, monkeypatch,
                                                                   pushed_types):
    """The mapping the engine hands over gives the sample and model the queries gave."""
    pushed = pushed_types(InProcessGrid)
    direct = _tiny(tmp_path / "direct")
    assert MessageType.QUERY not in pushed and MessageType.TRAIN in pushed

    pushed.clear()
    monkeypatch.setattr(InProcessGrid, "client_ids", lambda self: None)  # as Ray: ask
    queried = _tiny(tmp_path / "queried")
    assert pushed.count(MessageType.QUERY) == 6  # 8 clients, 2 held out
    assert _rounds(direct) == _rounds(queried) and any(_rounds(direct))
    assert ((direct.path / "model.pt").read_bytes() == (queried.path / "model.pt").read_bytes())


class TrickleGrid:
    """Answers at most ``per_pull`` of the asked-for messages per pull, in a shuffled order;
    records what each pull asked for."""

    def __init__(self, per_pull: int) -> None:
        self.per_pull = per_pull
        self.asked: list[list[str]] = []
        self._pushed: dict[str, Message] = {}

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            compat.set_message_id(m, f"m{i}")
            self._pushed[f"m{i}"] = m
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids):
        ids = list(message_ids)
        self.asked.append(ids)
        answer = ids[: self.per_pull]
        random.Random(len(self.asked)).shuffle(answer)
        return [Message(RecordDict(), reply_to=self._pushed[mid]) for mid in answer]


def test_each_poll_asks_only_for_the_replies_still_pending(monkeypatch):
    monkeypatch.setattr(ordered, "POLL_INTERVAL", 0.0)
    with compat.task_identity_restored():
        compat.set_task_identity(1)
        base = TrickleGrid(per_pull=3)
        grid = ClientOrderedGrid(base, expected_nodes=10)
        msgs = [Message(RecordDict(), node, MessageType.TRAIN) for node in range(1, 11)]
        replies = list(grid.send_and_receive(msgs, timeout=60))
    assert [r.metadata.reply_to_message_id for r in replies] == [f"m{i}" for i in range(10)]
    assert [len(a) for a in base.asked] == [10, 7, 4, 1]  # what is pending, never all again
    assert base.asked[1] == [f"m{i}" for i in range(3, 10)]  # in push order


def test_nodes_of_finds_each_clients_node_by_binary_search():
    with compat.task_identity_restored():
        compat.set_task_identity(1)
        grid = ClientOrderedGrid(RandomIdGrid({907: 5, 13: 2, 450: 0, 77: 9}), 4)
        assert grid.nodes_of([9, 0, 3, 5]) == [77, 450, 907]  # client 3 has no node
        assert grid.nodes_of([]) == []


def test_nodes_of_a_sample_costs_no_pass_over_a_million_nodes(monkeypatch):
    """The personalized evaluator's start-up: its sampled clients' nodes, O(sample log N)."""
    from types import SimpleNamespace

    from torch import nn

    from fedsim.server.evaluate import pick_clients
    from fedsim.server.personalized import PersonalizedEvaluator

    n = 1_000_000
    participating = range(0, 2 * n, 2)  # every other client id, as around holdout clients
    with compat.task_identity_restored():
        grid = ClientOrderedGrid(InProcessGrid(ClientApp(), n, client_ids=participating), n)
        grid.get_node_ids()  # discovery: once, before the evaluator (as in server_main)
        lookups = []
        client_id = ClientOrderedGrid.client_id
        monkeypatch.setattr(ClientOrderedGrid, "client_id",
                            lambda self, node: lookups.append(node) or client_id(self, node))
        clients = pick_clients(participating, 200, seed=0, purpose="participating")
        evaluator = SimpleNamespace(clients=clients, holdout=[], on_device=None)
        personal = PersonalizedEvaluator(("fedbn",), grid, evaluator, None, nn.Linear(1, 1),
                                         device=None)
    assert personal.nodes == [cid // 2 + 1 for cid in clients]  # node i+1 is client 2i
    assert len(lookups) <= len(clients) * (n.bit_length() + 2)  # ~22 per client, not 1M
