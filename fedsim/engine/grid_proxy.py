"""A Flower ``Grid`` that hands every call to another grid: the base of fedsim's grid
wrappers, which each change one thing (:class:`~fedsim.engine.ordered.ClientOrderedGrid`
the node order, :class:`~fedsim.engine.known_nodes.KnownNodesGrid` what is known of the
nodes) and inherit the rest from here."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedsim.compat import Run, pull_replies, pulled_ids


class DelegatingGrid(Grid):
    """Every ``Grid`` method of ``base``, unchanged."""

    def __init__(self, base: Grid) -> None:
        self.base = base

    def set_run(self, run: Run) -> None:
        self.base.set_run(run)

    @property
    def run(self) -> Run:
        return self.base.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.base.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.base.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.base.push_messages(messages)

    def pull_messages(self, reply_to_message_ids: Iterable[str] | None = None, *,
                      message_ids: Iterable[str] | None = None) -> Iterable[Message]:
        """Flower 1.41/1.42's ``pull_messages(message_ids)`` and 1.43's
        ``pull_messages(reply_to_message_ids=None, *, message_ids=None)`` alike."""
        return pull_replies(self.base, pulled_ids(reply_to_message_ids, message_ids))

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.base.send_and_receive(messages, timeout=timeout)
