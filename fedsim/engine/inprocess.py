"""The in-process engine: a Flower ``Grid`` that runs the ClientApp in this process.

It implements Flower's Grid interface, so unmodified Flower strategies drive it; messages
are handed to the ClientApp directly instead of through a SuperLink, with no Ray and no
serialization round trip. Building a ``Message`` outside Flower's runtimes needs the task
identity set; that happens here and only here.

Each node's ``Context.state`` lives in a :class:`ClientStateStore` between its messages
(memory budget, spill to disk), so 10,000 stateful clients cost what their budget allows.
With a ``cohort_trainer`` (``engine.vectorize``) the train messages pulled together are
handed to it as one cohort, which still answers each message with its own reply; a
``cohort_evaluator`` does the same for evaluate messages, and a ``cohort_moments`` for the
recalibration queries of ``server.bn_statistics = "recalibrate"``. With
``workers`` > 1 the messages (or cohorts) of a pull run on that many threads, each with its
own copy of the model; PyTorch releases the GIL inside its kernels, so compute-bound
clients use several cores.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, ValuesView
from typing import Any

import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsim import compat
from fedsim.client.messages import BN_MOMENTS, error_reply
from fedsim.client.runtime import WORKER_SLOT
from fedsim.compat import Run
from fedsim.engine.cohort_plan import balanced_cohorts
from fedsim.engine.store import ClientStateStore, decode_state, encode_state

log = logging.getLogger("fedsim")

#: Answers several messages at once: (messages, contexts) -> one reply per message
CohortHandler = Callable[[Sequence[Message], Sequence[Context]], list[Message]]

DEFAULT_STATE_MEMORY = 256 * 2**20


def set_task_identity(run_id: int) -> None:
    """Flower's Message constructor reads the sender's identity from this process-wide slot."""
    compat.set_task_identity(run_id)


def answer_cohort(handler: CohortHandler, msgs: Sequence[Message], nodes: Sequence[int],
                  states: Sequence[bytes | None], run_id: int, num_nodes: int,
                  run_config: Mapping[str, Any]) -> list[tuple[Message, bytes | None]]:
    """A cohort's messages answered by ``handler`` from their nodes' stored state bytes
    (:func:`~fedsim.engine.store.encode_state`; None: no state): per message, its reply and,
    for a successful reply, the client's new state bytes (``b""``: none), else None.

    Everything here is per-client work (each client's Context and its state decoded and
    encoded again), so it runs wherever the cohort runs: in the in-process grid, and on a Ray
    cohort actor (:mod:`fedsim.engine.ray_cohorts`), where the driver keeps only the bytes.
    A handler that raises answers every message with the reason.
    """
    contexts = [Context(run_id=run_id, node_id=node,
                        node_config={"partition-id": node - 1, "num-partitions": num_nodes},
                        state=RecordDict() if raw is None else decode_state(raw),
                        run_config=dict(run_config))
                for node, raw in zip(nodes, states)]
    try:
        replies = handler(msgs, contexts)
        if len(replies) != len(msgs):
            raise RuntimeError(f"{len(replies)} replies for {len(msgs)} messages")
    except Exception as exc:  # the whole cohort failed: every message says why
        replies = [error_reply(m, exc) for m in msgs]
    return [(r, None if r.has_error() else (encode_state(c.state) if len(c.state) else b""))
            for r, c in zip(replies, contexts)]


class InProcessGrid(Grid):
    """Grid whose nodes are ClientApp invocations in this process.

    Each node ``i`` (node id ``i + 1``) has ``partition-id = i`` and its own persistent
    ``Context.state`` (it survives between rounds, as on a real SuperNode), kept in
    ``state_store``. A Context is built for each message and its state written back after a
    successful reply; a client that raises leaves its previous state unchanged, and a node
    that no message reaches costs nothing.

    ``client_ids`` (optional), the fedsim client id behind each partition id (the ClientApp's
    own mapping), lets :meth:`client_ids` tell a :class:`~fedsim.engine.ordered.ClientOrderedGrid`
    which node is which client without asking every node. ``client_work`` (optional, with
    ``client_ids``), a client id's work estimate (its training samples), splits a kind's
    messages into cohorts of equal work when there are several (:meth:`_split`), so
    cohorts run side by side finish together.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1,
                 run_config: dict[str, Any] | None = None,
                 state_store: ClientStateStore | None = None,
                 cohort_trainer: CohortHandler | None = None,
                 cohort_size: int = 128, workers: int = 1,
                 cohort_evaluator: CohortHandler | None = None,
                 client_ids: Sequence[int] | None = None,
                 client_work: Callable[[int], float] | None = None,
                 cohort_moments: CohortHandler | None = None) -> None:
        if client_ids is not None and len(client_ids) != num_nodes:
            raise ValueError(f"error: {len(client_ids)} client ids for {num_nodes} nodes; pass "
                             "one client id per node (partition id)")
        self.client_app = client_app
        self._run = compat.empty_run(run_id)
        self._num_nodes = num_nodes
        self._client_ids = client_ids
        self._client_work = client_work if client_ids is not None else None
        self._run_config = dict(run_config or {})
        self.state_store = (ClientStateStore(DEFAULT_STATE_MEMORY) if state_store is None
                            else state_store)  # an empty store is falsy
        self.cohort_trainer = cohort_trainer
        self.cohort_evaluator = cohort_evaluator
        self.cohort_moments = cohort_moments
        self.cohort_size = cohort_size
        self.workers = max(1, int(workers))
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
        """Node ids ``1..num_nodes``, as a ``range``: no list of the population per call."""
        return range(1, self._num_nodes + 1)

    def client_ids(self) -> Mapping[int, int] | None:
        """Node id → fedsim client id, when the grid was given the clients' ids (else None:
        a :class:`~fedsim.engine.ordered.ClientOrderedGrid` then asks the nodes)."""
        return None if self._client_ids is None else NodeClients(self._client_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if not self._is_node(msg.metadata.dst_node_id):
                raise ValueError(f"message for unknown node {msg.metadata.dst_node_id}")
            compat.set_message_id(msg, uuid.uuid4().hex)
            self._pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, reply_to_message_ids: Iterable[str] | None = None, *,
                      message_ids: Iterable[str] | None = None) -> Iterable[Message]:
        """Replies to the pushed messages with these ids, under Flower 1.41/1.42's signature
        ``pull_messages(message_ids)`` and 1.43's ``(reply_to_message_ids=None, *,
        message_ids=None)`` alike."""
        message_ids = compat.pulled_ids(reply_to_message_ids, message_ids)
        jobs = self._jobs([m for m in message_ids if m in self._pending])
        for replies in self._run_jobs(jobs):
            self._replies.update(replies)
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))

    # -- client state ----------------------------------------------------------------
    def context(self, node_id: int) -> Context:
        """A Context for ``node_id`` holding a copy of its stored state."""
        return Context(
            run_id=self._run.run_id,
            node_id=node_id,
            node_config={"partition-id": node_id - 1, "num-partitions": self._num_nodes},
            state=self.state_store.get(node_id),
            run_config=dict(self._run_config),
        )

    def export_states(self) -> dict[int, RecordDict]:
        """Node id → Context.state of every node holding state (e.g. for a checkpoint)."""
        return dict(self.state_store.items())

    def export_changes(self) -> list[tuple[int, bytes | None]]:
        """Node id → state bytes (None: deleted) of the nodes whose state changed since the
        last call: what a checkpoint appends to its client-state journal."""
        return self.state_store.take_changes()

    def export_raw(self) -> list[tuple[int, bytes]]:
        """Node id → state bytes of every node holding state (a journal's next generation)."""
        store = self.state_store
        held = store.keys()
        return [(k, store.raw(k)) for k in held]

    def import_states(self, states: dict[int, RecordDict]) -> None:
        """Replace the stored states of the nodes in ``states`` (restoring a checkpoint); they
        count as saved, so the next checkpoint's journal does not write them again."""
        for node_id, state in states.items():
            if not self._is_node(int(node_id)):
                raise ValueError(f"client state for unknown node {node_id}")
            self.state_store.put(int(node_id), state)
        self.state_store.take_changes()

    def close(self) -> None:
        """Release the state store (its spill folder is removed), logging what it held."""
        store = self.state_store
        log.info("client-state store: %d clients, %.1f MB in memory (budget %.1f MB), "
                 "%.1f MB on disk, %d spills, %d loads", len(store), store.memory_bytes / 2**20,
                 store.memory_budget / 2**20, store.disk_bytes / 2**20, store.spills, store.loads)
        store.close()

    # -- execution -----------------------------------------------------------------
    def _is_node(self, node_id: int) -> bool:
        return isinstance(node_id, int) and 1 <= node_id <= self._num_nodes

    def _execute(self, msg: Message) -> Message:
        """Run the ClientApp on one message; an exception becomes an error reply."""
        node_id = msg.metadata.dst_node_id
        context = self.context(node_id)
        try:
            reply = self.client_app(msg, context)
        except Exception as exc:  # a failing client must not kill the run
            reply = self._error_reply(msg, exc)
        else:
            self.state_store.put(node_id, context.state)
        compat.set_message_id(reply, uuid.uuid4().hex)
        return reply

    def _error_reply(self, msg: Message, exc: Exception) -> Message:
        return error_reply(msg, exc)

    def _cohort_handler(self, message_type: str) -> CohortHandler | None:
        return {MessageType.TRAIN: self.cohort_trainer,
                MessageType.EVALUATE: self.cohort_evaluator,
                BN_MOMENTS: self.cohort_moments}.get(message_type)

    def _jobs(self, message_ids: list[str]) -> list[list[tuple[str, Message]]]:
        """Units of work, in message order within each kind: cohorts of the message types
        with a cohort handler (train, evaluate, BN moments), then single messages."""
        msgs = [(mid, self._pending.pop(mid)) for mid in message_ids]
        by_type: dict[str, list[tuple[str, Message]]] = {}
        singles = []
        for item in msgs:
            kind = item[1].metadata.message_type
            if self._cohort_handler(kind) is None:
                singles.append([item])
            else:
                by_type.setdefault(kind, []).append(item)
        jobs = [cohort for items in by_type.values() for cohort in self._split(items)]
        return jobs + singles

    def _split(self, items: list[tuple[str, Message]]) -> list[list[tuple[str, Message]]]:
        """The cohorts one kind's messages run in, of :meth:`_cohort_sizes` messages each:
        of equal work (:func:`~fedsim.engine.cohort_plan.balanced_cohorts` on the clients'
        ``client_work``) where there are several and the work is known, else consecutive
        runs in message order."""
        sizes = self._cohort_sizes(len(items))
        if self._client_work is not None and len(sizes) > 1:
            ids, work = self._client_ids, self._client_work
            plan = balanced_cohorts([work(ids[m.metadata.dst_node_id - 1]) for _, m in items],
                                    sizes)
            return [[items[i] for i in cohort] for cohort in plan]
        jobs, start = [], 0
        for size in sizes:
            jobs.append(items[start : start + size])
            start += size
        return jobs

    def _cohort_sizes(self, n: int) -> list[int]:
        """Sizes of the cohorts ``n`` messages of one kind run in, in message order."""
        return [min(self.cohort_size, n - i) for i in range(0, n, self.cohort_size)]

    def _do(self, job: list[tuple[str, Message]]) -> dict[str, Message]:
        handler = self._cohort_handler(job[0][1].metadata.message_type)
        if handler is not None:
            return self._execute_cohort(job, handler)
        mid, msg = job[0]
        return {mid: self._execute(msg)}

    def _run_jobs(self, jobs: list) -> list[dict[str, Message]]:
        """Run jobs; with ``workers`` > 1, job i goes to worker i mod workers (a fixed
        assignment, so each worker's model copy sees the same clients in every run)."""
        if self.workers == 1 or len(jobs) <= 1:
            return [self._do(job) for job in jobs]
        lanes = [jobs[k :: self.workers] for k in range(self.workers)]
        results: list[list] = [[] for _ in lanes]
        errors: list[BaseException] = []
        threads_per_worker = torch.get_num_threads()  # OpenMP settings are per thread
        stop = threading.Event()

        def lane(k: int) -> None:
            WORKER_SLOT.set(k)  # this thread trains on worker k's copy of the model
            torch.set_num_threads(threads_per_worker)
            try:
                for job in lanes[k]:
                    if stop.is_set():
                        return
                    results[k].append(self._do(job))
            except BaseException as exc:  # a bug, not a client failure: re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=lane, args=(k,), name=f"fedsim-worker-{k}")
                   for k in range(len(lanes)) if lanes[k]]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:  # Ctrl-C / SIGTERM: the workers end their current job, so
            stop.set()  # none uses the state store after the grid closes it
            for t in threads:
                t.join()
            raise
        if errors:
            raise errors[0]
        return [r for lane_results in results for r in lane_results]

    def _execute_cohort(self, job: list[tuple[str, Message]], handler: CohortHandler
                        ) -> dict[str, Message]:
        """Hand a cohort of messages of one type to its handler (:func:`answer_cohort`); one
        reply per message, and the new state of each client that answered without error."""
        msgs = [msg for _, msg in job]
        nodes = [m.metadata.dst_node_id for m in msgs]
        store = self.state_store
        answers = answer_cohort(handler, msgs, nodes, [store.raw(n) for n in nodes],
                                self._run.run_id, self._num_nodes, self._run_config)
        out = {}
        for (mid, _), node, (reply, state) in zip(job, nodes, answers):
            if state is not None:
                store.put_raw(node, state)
            compat.set_message_id(reply, uuid.uuid4().hex)
            out[mid] = reply
        return out


class NodeClients(Mapping[int, int]):
    """Node id ``i + 1`` → ``client_ids[i]``, read from the sequence (no dict of the
    population).

    ``in_client_order`` says, without reading every id, that node order is client order
    (the sequence declares ``ascending``, as a population's participating clients do), and
    :meth:`node_of` finds a client's node through the sequence's own ``index``.
    """

    def __init__(self, client_ids: Sequence[int]) -> None:
        self._ids = client_ids

    def __getitem__(self, node_id: int) -> int:
        if not isinstance(node_id, int) or not 1 <= node_id <= len(self._ids):
            raise KeyError(node_id)
        return int(self._ids[node_id - 1])

    def __iter__(self) -> Iterator[int]:
        return iter(range(1, len(self._ids) + 1))

    def __len__(self) -> int:
        return len(self._ids)

    def values(self) -> ValuesView[int]:
        """The client ids in node order, read straight from the sequence."""
        return _SequenceValues(self)

    @property
    def in_client_order(self) -> bool:
        """Whether node ids increase with client ids, known without reading the ids."""
        ids = self._ids
        return bool(getattr(ids, "ascending", False)) or (isinstance(ids, range)
                                                          and ids.step > 0)

    def node_of(self, client_id: int) -> int | None:
        """The node behind fedsim client ``client_id`` (None: no node trains it)."""
        try:
            return self._ids.index(client_id) + 1
        except ValueError:
            return None


class _SequenceValues(ValuesView):
    def __iter__(self) -> Iterator[int]:
        return iter(self._mapping._ids)


def run_inprocess(server_app: ServerApp, client_app: ClientApp, num_nodes: int,
                  run_config: dict[str, Any] | None = None,
                  state_store: ClientStateStore | None = None,
                  cohort_trainer: CohortHandler | None = None, cohort_size: int = 128,
                  workers: int = 1, cohort_evaluator: CohortHandler | None = None,
                  client_ids: Sequence[int] | None = None,
                  client_work: Callable[[int], float] | None = None,
                  cohort_moments: CohortHandler | None = None) -> None:
    """Run ``server_app`` against ``num_nodes`` in-process ClientApp nodes; ``client_ids``:
    the fedsim client id of each partition id, when known, and ``client_work`` a client's
    work estimate (see :class:`InProcessGrid`)."""
    grid = InProcessGrid(client_app, num_nodes, run_config=run_config, state_store=state_store,
                         cohort_trainer=cohort_trainer, cohort_size=cohort_size,
                         workers=workers, cohort_evaluator=cohort_evaluator,
                         client_ids=client_ids, client_work=client_work,
                         cohort_moments=cohort_moments)
    serve(server_app, grid, run_config)


def serve(server_app: ServerApp, grid: InProcessGrid,
          run_config: dict[str, Any] | None = None) -> None:
    """Run ``server_app`` on ``grid`` in this thread, then close the grid (its state store)."""
    server_context = Context(run_id=grid.run.run_id, node_id=0, node_config={},
                             state=RecordDict(), run_config=dict(run_config or {}))
    try:
        server_app(grid, server_context)
    finally:
        grid.close()
