"""The in-process engine: a Flower ``Grid`` that runs the ClientApp in this process.

It implements Flower's Grid interface, so unmodified Flower strategies drive it; messages
are handed to the ClientApp directly instead of through a SuperLink, with no Ray and no
serialization round trip. Building a ``Message`` outside Flower's runtimes needs the task
identity set; that happens here and only here.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger("fedsim")

#: Error code for a ClientApp that raised (Flower uses 0 for unknown errors)
CLIENT_EXCEPTION = 1


def set_task_identity(run_id: int) -> None:
    """Flower's Message constructor reads the sender's identity from this process-wide slot."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


class InProcessGrid(Grid):
    """Grid whose nodes are ClientApp invocations in this process.

    Each node ``i`` (node id ``i + 1``) has ``partition-id = i`` and its own persistent
    ``Context`` (``Context.state`` survives between rounds, as on a real SuperNode).
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1,
                 run_config: dict[str, Any] | None = None) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self._node_ids = [i + 1 for i in range(num_nodes)]
        self._num_nodes = num_nodes
        self._run_config = dict(run_config or {})
        self._contexts: dict[int, Context] = {}
        self._pending: dict[str, Message] = {}
        self._replies: dict[str, Message] = {}
        set_task_identity(run_id)

    # -- Grid interface ------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self._node_set():
                raise ValueError(f"message for unknown node {msg.metadata.dst_node_id}")
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self._pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for mid in message_ids:
            if mid in self._pending:
                self._replies[mid] = self._execute(self._pending.pop(mid))
            if mid in self._replies:
                out.append(self._replies.pop(mid))
        return out

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))

    # -- execution -----------------------------------------------------------------
    def _node_set(self) -> set[int]:
        return set(self._node_ids)

    def context(self, node_id: int) -> Context:
        """The node's persistent Context (created on first use)."""
        if node_id not in self._contexts:
            self._contexts[node_id] = Context(
                run_id=self._run.run_id,
                node_id=node_id,
                node_config={"partition-id": node_id - 1, "num-partitions": self._num_nodes},
                state=RecordDict(),
                run_config=dict(self._run_config),
            )
        return self._contexts[node_id]

    def export_states(self) -> dict[int, RecordDict]:
        """Every node's non-empty ``Context.state`` by node id (what a checkpoint saves)."""
        return {nid: ctx.state for nid, ctx in self._contexts.items() if len(ctx.state)}

    def import_states(self, states: dict[int, RecordDict]) -> None:
        """Replace nodes' ``Context.state`` (restoring a checkpoint before the first round)."""
        for nid, state in states.items():
            if nid not in self._node_set():
                raise ValueError(f"client state for unknown node {nid}")
            self.context(nid).state = state

    def _execute(self, msg: Message) -> Message:
        """Run the ClientApp on one message; an exception becomes an error reply."""
        node_id = msg.metadata.dst_node_id
        try:
            reply = self.client_app(msg, self.context(node_id))
        except Exception as exc:  # a failing client must not kill the run
            reason = f"client node {node_id} raised {type(exc).__name__}: {exc}"
            log.warning("%s\n%s", reason, traceback.format_exc(limit=3))
            reply = Message(Error(code=CLIENT_EXCEPTION, reason=reason), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return reply


def run_inprocess(server_app: ServerApp, client_app: ClientApp, num_nodes: int,
                  run_config: dict[str, Any] | None = None) -> None:
    """Run ``server_app`` against ``num_nodes`` in-process ClientApp nodes."""
    grid = InProcessGrid(client_app, num_nodes, run_config=run_config)
    server_context = Context(run_id=grid.run.run_id, node_id=0, node_config={},
                             state=RecordDict(), run_config=dict(run_config or {}))
    server_app(grid, server_context)
