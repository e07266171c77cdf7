"""A Grid wrapper that lists nodes in client-id order, so sampling is engine-independent.

Flower samples ``random.sample(grid.get_node_ids(), k)``. Node ids are arbitrary (random on
Flower's engines), so the same seed would pick different clients on different engines — or
on two Ray runs. This wrapper learns every node's fedsim client id and lists nodes sorted by
it; with the seeded ``random``, every engine then trains the same clients in the same rounds.

A grid that knows the mapping hands it over through an optional ``client_ids()`` method
(node id → client id, or None when it does not know); no message is sent. The in-process
engine creates its nodes, so it knows; on Ray, the engine records the node registration
Flower makes (:class:`fedsim.engine.known_nodes.KnownNodesGrid`). Other grids are asked: one
``query`` message per node, once. On the Deployment Engine the SuperLink gives each
SuperNode a random node id when it registers, the ``partition-id`` stays in the SuperNode's
``--node-config``, and Flower's Grid API offers the ServerApp no node attribute to read it
from; fedsim's local deployment reads each SuperNode's id from its log instead
(:meth:`fedsim.engine.deploy.LocalDeployment.node_partitions`), and SuperNodes started any
other way are asked.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Iterable, Mapping, Sequence
from itertools import islice

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsim.compat import pull_replies
from fedsim.engine.grid_proxy import DelegatingGrid
from fedsim.records import require_record

QUERY_TIMEOUT = 600.0
POLL_INTERVAL = 0.05  # seconds between pulls while replies are outstanding (Flower: 0.1 s
#                     in simulation, 3 s over the network)
#: seconds to wait for all expected nodes to register (Flower's engines start them in parallel)
CONNECT_TIMEOUT = 300.0


class ClientOrderedGrid(DelegatingGrid):
    """Delegates to ``base``; ``get_node_ids`` is sorted by each node's client id, which
    ``base.client_ids()`` gives where the base has it, else each node reports."""

    def __init__(self, base: Grid, expected_nodes: int,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        super().__init__(base)
        self.expected_nodes = expected_nodes
        self.connect_timeout = connect_timeout
        self._client_of: Mapping[int, int] | None = None
        self._sorted: Sequence[int] | None = None
        self._node_of: dict[int, int] | None = None  # client id → node id, when queried

    def _wait_for_nodes(self) -> list[int]:
        """All ``expected_nodes`` node ids, waiting while the engine registers them."""
        deadline = time.monotonic() + self.connect_timeout
        while len(nodes := list(self.base.get_node_ids())) < self.expected_nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(nodes)} of {self.expected_nodes} client nodes connected within "
                    f"{self.connect_timeout:.0f} s"
                )
            time.sleep(0.05)
        return nodes

    def _discover(self) -> Mapping[int, int]:
        if self._client_of is None:
            known = self._known()
            self._client_of = self._query() if known is None else known
        return self._client_of

    def _known(self) -> Mapping[int, int] | None:
        """The base grid's own node → client id mapping, if it has one."""
        client_ids = getattr(self.base, "client_ids", None)
        mapping = client_ids() if callable(client_ids) else None
        if mapping is not None and len(mapping) != self.expected_nodes:
            raise RuntimeError(f"the grid knows {len(mapping)} client nodes, the federation "
                               f"has {self.expected_nodes}")
        return mapping

    def _query(self) -> dict[int, int]:
        """Ask every node for its client id (one ``query`` message each)."""
        nodes = self._wait_for_nodes()
        msgs = [Message(RecordDict({"config": ConfigRecord({"want": "client-id"})}),
                        node, MessageType.QUERY) for node in nodes]
        replies = list(self.base.send_and_receive(msgs, timeout=QUERY_TIMEOUT))
        bad = [r for r in replies if r.has_error()]
        if bad or len(replies) != len(nodes):
            reason = bad[0].error.reason if bad else "missing replies"
            raise RuntimeError(f"could not ask the client nodes for their ids: {reason}")
        return {
            r.metadata.src_node_id:
                int(require_record(r.content, "client", ConfigRecord)["client-id"])
            for r in replies
        }

    def client_id(self, node_id: int) -> int | None:
        """The fedsim client id behind ``node_id``."""
        return self._discover().get(node_id)

    def nodes_of(self, clients: Iterable[int]) -> list[int]:
        """The node ids of ``clients``, in their order (clients without a node are left
        out): :meth:`node_id` per client, so a sample costs no pass over the population."""
        return [n for n in map(self.node_id, clients) if n is not None]

    def node_id(self, client_id: int) -> int | None:
        """The node behind fedsim client ``client_id`` (None: no node is that client).

        A mapping that can answer itself (the in-process engine's, O(log N)) does; the
        mapping learned by asking the nodes is inverted once."""
        mapping = self._discover()
        node_of = getattr(mapping, "node_of", None)
        if callable(node_of):
            return node_of(client_id)
        if self._node_of is None:
            self._node_of = {c: n for n, c in mapping.items()}
        return self._node_of.get(client_id)

    def get_node_ids(self) -> Iterable[int]:
        """Node ids in increasing client id order (an immutable sequence, built once).

        A tuple: Flower copies the node list with ``list()`` every round, and copying a
        tuple of ints is a memory copy, ~4x faster than materializing a ``range``."""
        if self._sorted is None:
            mapping = self._discover()
            if getattr(mapping, "in_client_order", False):  # in-process: no id is read
                self._sorted = tuple(mapping)
                return self._sorted
            nodes = list(mapping)
            clients = list(mapping.values())
            if all(map(operator.lt, clients, islice(clients, 1, None))):
                self._sorted = tuple(nodes)  # already in client order (in-process): no sort
            else:
                self._sorted = tuple(n for _, n in sorted(zip(clients, nodes)))
        return self._sorted

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push, pull every ``POLL_INTERVAL`` s until all replies are in or ``timeout``;
        replies come back in the order of ``messages``.

        Flower's network grid sleeps 3 s between pulls; polling faster saves most of that
        per round on the Deployment Engine (an in-process grid answers on the first pull).
        Replies arrive in any order on Flower's engines; returning them in message order
        makes the strategy aggregate in the same order on every engine and every run.
        """
        ids = list(self.base.push_messages(messages))
        position = {mid: i for i, mid in enumerate(ids)}
        pending = dict.fromkeys(ids)  # still unanswered, in push order (which each pull keeps)
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:  # a poll costs what it asks for and gets, not all ``ids`` again
            got = list(pull_replies(self.base, pending))
            for reply in got:
                pending.pop(reply.metadata.reply_to_message_id, None)
            replies += got
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(POLL_INTERVAL)
        return sorted(replies, key=lambda m: position.get(m.metadata.reply_to_message_id,
                                                          len(ids)))
