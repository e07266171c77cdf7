"""A Grid wrapper that lists nodes in client-id order, so sampling is engine-independent.

Flower samples ``random.sample(grid.get_node_ids(), k)``. Node ids are arbitrary (random on
Flower's engines), so the same seed would pick different clients on different engines — or
on two Ray runs. This wrapper asks every node once for its fedsim client id (a ``query``
message) and lists nodes sorted by it; with the seeded ``random``, every engine then trains
the same clients in the same rounds.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedsim.errors import ScenarioError

QUERY_TIMEOUT = 600.0


class ClientOrderedGrid(Grid):
    """Delegates to ``base``; ``get_node_ids`` is sorted by the client id each node reports."""

    def __init__(self, base: Grid, num_nodes: int | None = None,
                 connect_timeout: float = QUERY_TIMEOUT) -> None:
        self.base = base
        self.num_nodes = num_nodes
        self.connect_timeout = connect_timeout
        self._client_of: dict[int, int] | None = None

    def _connected_nodes(self) -> list[int]:
        """The base grid's nodes, once all ``num_nodes`` are connected.

        Flower's Ray engine registers its SuperNodes while the ServerApp already runs; asking
        too early would fix a partial node list for good (and Flower's sampling would then
        wait forever for the missing nodes).
        """
        deadline = time.monotonic() + self.connect_timeout
        while True:
            nodes = list(self.base.get_node_ids())
            if self.num_nodes is None or len(nodes) >= self.num_nodes:
                return nodes
            if time.monotonic() > deadline:
                raise ScenarioError(
                    f"only {len(nodes)} of {self.num_nodes} client nodes connected within "
                    f"{self.connect_timeout:.0f} s"
                )
            time.sleep(0.05)

    def _discover(self) -> dict[int, int]:
        if self._client_of is None:
            nodes = self._connected_nodes()
            msgs = [Message(RecordDict({"config": ConfigRecord({"want": "client-id"})}),
                            node, MessageType.QUERY) for node in nodes]
            replies = list(self.base.send_and_receive(msgs, timeout=QUERY_TIMEOUT))
            bad = [r for r in replies if r.has_error()]
            if bad or len(replies) != len(nodes):
                reason = bad[0].error.reason if bad else "missing replies"
                raise ScenarioError(f"could not ask the client nodes for their ids: {reason}")
            self._client_of = {
                r.metadata.src_node_id: int(r.content.config_records["client"]["client-id"])
                for r in replies
            }
        return self._client_of

    def client_id(self, node_id: int) -> int | None:
        """The fedsim client id behind ``node_id``."""
        return self._discover().get(node_id)

    def get_node_ids(self) -> Iterable[int]:
        mapping = self._discover()
        return sorted(mapping, key=mapping.__getitem__)

    # -- plain delegation ----------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self.base.set_run(run)

    @property
    def run(self) -> Run:
        return self.base.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self.base.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.base.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.base.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.base.send_and_receive(messages, timeout=timeout)
