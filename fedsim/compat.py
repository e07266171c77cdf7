"""Every private torch and Flower name fedsim uses, in one place.

fedsim leans on a few internals that have no public equivalent: functorch's batched tensors
(to fold a ``vmap`` cohort into one native kernel call), torch's fused LSTM kernel on
explicit weights, torch's BatchNorm base class,
Flower's message ids, task identity, record storage and serde. Any release may change them
without notice, so nothing else in fedsim imports them: it imports this module, and
tests/test_compat.py checks each use against the installed versions, failing with the
version the use was written for (:data:`TORCH_WRITTEN_FOR`, :data:`FLWR_WRITTEN_FOR`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flwr
import torch._C._functorch as _functorch_c
from flwr.app import Array, ArrayRecord, Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.serverapp.strategy import fedavg as _fedavg
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from torch import _VF, Tensor
from torch._functorch.pyfunctorch import TransformType, retrieve_all_functorch_interpreters
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger("fedsim")

#: the torch release the private uses below were written and tested for
TORCH_WRITTEN_FOR = "2.13"
#: the Flower releases the private uses below were written and tested for
FLWR_WRITTEN_FOR = ("1.41", "1.42")


def release(version: str) -> str:
    """``"major.minor"`` of a version string (``"1.42.0"`` → ``"1.42"``)."""
    return ".".join(version.split("+")[0].split(".")[:2])


# =========================================================================== torch

#: torch's base of BatchNorm1d/2d/3d (running statistics, momentum, ``_check_input_dim``);
#: fedsim's own BatchNorm takes any (N, C, ...) input, so it derives from the base
BatchNormBase = _BatchNorm


def folding_vmap() -> Any | None:
    """The ``vmap`` interpreter when ``vmap`` is the innermost transform and every other is
    ``vmap`` or ``grad`` (a bare ``vmap``, a cohort's case, or ``grad(vmap(f))``), else None:
    where a layer may hand ``vmap``'s stacked tensor to one native kernel. The interpreter
    has ``level()`` and ``lower()`` (a context in which ops see the stacked tensors)."""
    interpreters = retrieve_all_functorch_interpreters()
    if not interpreters or interpreters[-1].key() != TransformType.Vmap:
        return None
    if any(i.key() not in (TransformType.Vmap, TransformType.Grad) for i in interpreters):
        return None
    return interpreters[-1]


def under_vmap() -> bool:
    """Whether ``torch.func.vmap`` is active at any level."""
    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def is_batched(t: Tensor, level: int) -> bool:
    """Whether ``t`` carries ``vmap``'s dimension at ``level``."""
    return _functorch_c.is_batchedtensor(t) and _functorch_c.maybe_get_level(t) == level


def unwrap_batched(t: Tensor, level: int) -> tuple[Tensor, int]:
    """A tensor batched at ``level``: its stacked tensor and where ``vmap``'s dim sits."""
    return _functorch_c._unwrap_batched(t, level)


def add_batch_dim(t: Tensor, dim: int, level: int) -> Tensor:
    """Stacked ``t`` handed back to ``vmap`` (at ``level``) with its dim at ``dim``."""
    return _functorch_c._add_batch_dim(t, dim, level)


def lstm_layer(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor,
               train: bool = True) -> Tensor:
    """The outputs ``(B, T, H)`` of one batch-first LSTM layer with these weights, from zero
    states: the fused kernel ``nn.LSTM`` runs (``torch._VF.lstm``), callable on explicit
    weights, for a cohort that runs each client's weights through it in turn."""
    h0 = x.new_zeros((1, x.shape[0], w_hh.shape[1]))
    out, _, _ = _VF.lstm(x, (h0, h0), [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, train, False,
                         True)
    return out


# =========================================================================== Flower

def set_message_id(message: Message, message_id: str) -> None:
    """Give ``message`` an id, as a SuperLink does when it stores a pushed message (Flower's
    ``Metadata.message_id`` has no setter)."""
    message.metadata.__dict__["_message_id"] = message_id


def set_task_identity(run_id: int, task_id: int = 1, node_id: int = SUPERLINK_NODE_ID) -> None:
    """Set the process-wide sender identity Flower's ``Message`` constructor reads (a
    SuperLink's node id by default: the server side of a run)."""
    TaskIdentity.task_id = task_id
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id


_TASK_IDENTITY_SLOTS = ("_task_id", "_run_id", "_node_id")


@contextlib.contextmanager
def task_identity_restored() -> Iterator[None]:
    """Restore Flower's process-wide task identity on exit, unset slots included (its
    properties raise when a slot was never set, so the raw slots are saved)."""
    saved = {f: getattr(TaskIdentity, f) for f in _TASK_IDENTITY_SLOTS}
    try:
        yield
    finally:
        for f, value in saved.items():
            setattr(TaskIdentity, f, value)


def task_identity() -> tuple[int | None, int | None, int | None]:
    """The raw (task id, run id, node id) slots; None where unset (for tests)."""
    return tuple(getattr(TaskIdentity, f) for f in _TASK_IDENTITY_SLOTS)


def empty_run(run_id: int) -> Run:
    """A ``Run`` with only its id set: what a Grid reports before ``set_run``."""
    return Run.create_empty(run_id)


def pulled_ids(reply_to_message_ids: Iterable[str] | None,
               message_ids: Iterable[str] | None) -> list[str]:
    """The ids a ``Grid.pull_messages`` call asks replies for, under either signature:
    ``pull_messages(message_ids)`` (Flower 1.41/1.42, positional or keyword) or
    ``pull_messages(reply_to_message_ids=None, *, message_ids=None)`` (Flower 1.43)."""
    if reply_to_message_ids is not None and message_ids is not None:
        raise TypeError("error: pull_messages got both reply_to_message_ids and message_ids; "
                        "pass the pushed messages' ids once")
    ids = reply_to_message_ids if reply_to_message_ids is not None else message_ids
    if ids is None:
        raise TypeError("error: pull_messages needs the ids of the pushed messages whose "
                        "replies to pull (reply_to_message_ids)")
    return list(ids)


def pull_replies(grid: Any, message_ids: Iterable[str]) -> Iterable[Message]:
    """``grid.pull_messages`` for the replies to ``message_ids``: positional, which both
    Flower signatures read as the pushed messages' ids."""
    return grid.pull_messages(list(message_ids))


# -- the simulation engine's node registration ---------------------------------------------


class RegisteredNodes:
    """The node id → partition id mapping of an engine's registered nodes, handed from where
    the engine learns it (the thread that registers Ray's virtual SuperNodes, the Deployment
    Engine's launcher) to the ServerApp, which waits for it.

    Flower gives a ServerApp no way to learn which node has which ``partition-id``: node ids
    are random (``LinkState.create_node``), the partition id lives only in each node's
    ``node_config`` on the client side, and ``run_simulation`` keeps the mapping
    (``vce_api._register_nodes``' result) to itself. :func:`recorded_simulation_nodes`
    copies that result here instead of the ServerApp asking every node.
    """

    def __init__(self) -> None:
        self._mapping: dict[int, int] | None = None
        self._ready = threading.Event()

    def record(self, mapping: dict[int, int]) -> None:
        self._mapping = dict(mapping)
        self._ready.set()

    def wait(self, timeout: float | None) -> dict[int, int] | None:
        """The recorded mapping, waiting up to ``timeout`` s for the engine to register its
        nodes; None if it did not within that time."""
        return self._mapping if self._ready.wait(timeout) else None


_register_lock = threading.Lock()


@contextlib.contextmanager
def recorded_simulation_nodes() -> Iterator[RegisteredNodes | None]:
    """While the block runs, record the mapping of the nodes Flower's simulation engine
    registers (it wraps ``flwr.server.superlink.fleet.vce.vce_api._register_nodes``, which
    ``start_vce`` calls by its module name; restored on exit). One simulation at a time per
    process (Ray's own limit): a second, concurrent one is refused.

    Yields None, with a log line, where the installed Flower has no such function (the
    ServerApp then asks every node, as before).
    """
    from flwr.server.superlink.fleet.vce import vce_api  # late: the simulation engine

    original = getattr(vce_api, "_register_nodes", None)
    if original is None:
        log.warning("Flower %s has no vce_api._register_nodes: the ServerApp asks each node "
                    "for its client id (one query message per node)", flwr.__version__)
        yield None
        return
    if not _register_lock.acquire(blocking=False):
        raise RuntimeError("error: a Flower simulation is already running in this process; "
                           "run one simulation at a time (Ray allows one per process)")
    nodes = RegisteredNodes()

    def register(*args: Any, **kwargs: Any) -> dict[int, int]:
        mapping = original(*args, **kwargs)
        nodes.record(mapping)
        return mapping

    vce_api._register_nodes = register
    try:
        yield nodes
    finally:
        vce_api._register_nodes = original
        _register_lock.release()


def undelivered_nodes(state: Any, nodes: Any) -> list[int]:
    """The nodes (of ``nodes``) that have an undelivered message in an in-memory LinkState,
    in the order their first such message was stored: one pass over the stored messages
    (``InMemoryLinkState.message_ins_store``, under its lock)."""
    with state.lock:
        waiting = [m.metadata.dst_node_id for m in state.message_ins_store.values()
                   if m.metadata.delivered_at == ""]
    return [node for node in dict.fromkeys(waiting) if node in nodes]


_delivery_lock = threading.Lock()


@contextlib.contextmanager
def simulation_delivery_by_message() -> Iterator[None]:
    """While the block runs, Flower's simulation engine hands messages to its workers by
    visiting the nodes that have one, not every node.

    Flower's ``vce_api.add_messages_to_queue`` asks the LinkState, every 0.1 s, for each
    registered node's next message, and the in-memory LinkState answers each by scanning
    every stored message: O(nodes × messages) per sweep, which made a round at 100,000
    clients ten times one at 10,000. The replacement first finds the nodes with an
    undelivered message (:func:`undelivered_nodes`) and asks only those, the same way (at
    most one message per node per sweep, Flower's expiry checks included). Where the state
    is not an in-memory LinkState it does what Flower does. Restored on exit; one simulation
    at a time per process.
    """
    from flwr.server.superlink.fleet.vce import vce_api  # late: the simulation engine
    from flwr.server.superlink.linkstate import InMemoryLinkState

    original = getattr(vce_api, "add_messages_to_queue", None)
    if original is None:
        log.warning("Flower %s has no vce_api.add_messages_to_queue: its own message loop "
                    "runs (it visits every node every 0.1 s)", flwr.__version__)
        yield
        return
    if not _delivery_lock.acquire(blocking=False):
        raise RuntimeError("error: a Flower simulation is already running in this process; "
                           "run one simulation at a time (Ray allows one per process)")

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
        if not isinstance(state, InMemoryLinkState):
            return original(state, queue, nodes_mapping, f_stop)
        while not f_stop.is_set():
            for node_id in undelivered_nodes(state, nodes_mapping):
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(0.1)
        return None

    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original
        _delivery_lock.release()


#: Ray errors that mean a simulation's actor (or its node) is gone, not that a client raised
RAY_PROCESS_LOST = ("ActorDiedError", "RayActorError", "ActorUnavailableError",
                    "WorkerCrashedError", "NodeDiedError", "RaySystemError", "LocalRayletDiedError",
                    "OutOfMemoryError")
_REASON = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>\Z", re.DOTALL)


def simulation_process_lost(message: Message) -> str | None:
    """``"<Ray error>: <first line>"`` when ``message`` is the error reply Flower's simulation
    engine makes for a message whose Ray actor or node died (its worker writes the reason as
    ``str(type(exc)) + ":<'" + str(exc) + "'>"``, ``vce_api.worker``), else None. A client's
    own exception never has this form: fedsim's ClientApp answers it with its own reason."""
    if not message.has_error():
        return None
    found = _REASON.match(message.error.reason or "")
    if found is None or found.group(1) not in RAY_PROCESS_LOST:
        return None
    first = (found.group(2).strip().splitlines() or [""])[0]
    if len(first) > 160:  # Ray's out-of-memory message lists the node's top processes
        first = first[:157] + "..."
    return f"{found.group(1)}: {first}".rstrip(": ")


# -- records: the speed-ups fedsim.arrays installs ------------------------------------------

#: the base of Flower's records and RecordDict (flwr.app.message.typeddict.TypedDict)
TypedDict = next(c for c in ArrayRecord.__mro__ if c.__name__ == "TypedDict")
_flower_numpy = Array.numpy
_flower_setitem = TypedDict.__setitem__
#: Flower's weighted average of replies' ArrayRecords and its reply consistency check, which
#: ``FedAvg`` (and every strategy built on it) calls by their names in
#: ``flwr.serverapp.strategy.fedavg``
_flower_aggregate = _fedavg.aggregate_arrayrecords
_flower_validate = _fedavg.validate_message_reply_consistency


def flower_numpy(arr: Array):
    """Flower's own ``Array.numpy`` (its ``.npy`` parser), whatever is installed."""
    return _flower_numpy(arr)


def new_array(dtype_name: str, shape: tuple[int, ...], data: bytes, stype: str) -> Array:
    """``Array(dtype=..., shape=..., stype=..., data=...)`` without its argument dispatch:
    the same four fields and the same fresh-object dirty flag."""
    arr = Array.__new__(Array)
    arr.__dict__.update(dtype=dtype_name, shape=shape, stype=stype, data=data, _is_dirty=True)
    return arr


def fill_record(record: ArrayRecord, arrays: dict[str, Array]) -> ArrayRecord:
    """Put ``arrays`` (already type-checked, not copied) into the empty ``record`` as setting
    them one by one would: same items, dirty flag set."""
    record.__dict__["_data"].update(arrays)
    record.__dict__["_is_dirty"] = True
    return record


def flower_aggregate_arrayrecords(records: list, weighting_metric_name: str) -> ArrayRecord:
    """Flower's own ``aggregate_arrayrecords``, whatever is installed."""
    return _flower_aggregate(records, weighting_metric_name)


def _fast_setitem(self, key: object, value: object) -> None:
    d = self.__dict__
    d["_check_key_fn"](key)
    d["_check_value_fn"](value)
    d["_data"][key] = value


_fast_setitem.__doc__ = _flower_setitem.__doc__
_patch_depth = 0


def fast_records_supported() -> bool:
    """Whether the installed Flower is one :func:`fast_records` was checked against."""
    return release(flwr.__version__) in FLWR_WRITTEN_FOR


@contextlib.contextmanager
def fast_records(numpy: Callable[[Array], Any],
                 aggregate: Callable[[list, str], ArrayRecord] | None = None,
                 validate: Callable[[list, str, bool], None] | None = None) -> Iterator[None]:
    """Replace Flower's ``Array.numpy`` by ``numpy``, ``TypedDict.__setitem__`` by the same
    key/value checks without ``typing`` casts and (if given) the ``aggregate_arrayrecords``
    and ``validate_message_reply_consistency`` that ``FedAvg`` calls by ``aggregate`` and
    ``validate``, while the block runs; re-entrant, restored on exit. On a Flower release
    not in :data:`FLWR_WRITTEN_FOR` nothing is replaced (the results are Flower's own either
    way; only the speed differs), and a log line says so."""
    global _patch_depth
    if not fast_records_supported():
        log.info("Flower %s is not one fedsim's record fast paths were checked against (%s): "
                 "using Flower's own", flwr.__version__, ", ".join(FLWR_WRITTEN_FOR))
        yield
        return
    _patch_depth += 1
    Array.numpy = numpy
    TypedDict.__setitem__ = _fast_setitem
    if aggregate is not None:
        _fedavg.aggregate_arrayrecords = aggregate
    if validate is not None:
        _fedavg.validate_message_reply_consistency = validate
    try:
        yield
    finally:
        _patch_depth -= 1
        if _patch_depth == 0:
            Array.numpy = _flower_numpy
            TypedDict.__setitem__ = _flower_setitem
            _fedavg.aggregate_arrayrecords = _flower_aggregate
            _fedavg.validate_message_reply_consistency = _flower_validate


__all__ = [
    "FLWR_WRITTEN_FOR",
    "ProtoRecordDict",
    "SUPERLINK_NODE_ID",
    "TORCH_WRITTEN_FOR",
    "BatchNormBase",
    "Run",
    "RegisteredNodes",
    "TypedDict",
    "add_batch_dim",
    "add_gaussian_noise_inplace",
    "compute_stdv",
    "empty_run",
    "fast_records",
    "fill_record",
    "flower_aggregate_arrayrecords",
    "flower_numpy",
    "folding_vmap",
    "is_batched",
    "new_array",
    "pull_replies",
    "pulled_ids",
    "recorded_simulation_nodes",
    "recorddict_from_proto",
    "recorddict_to_proto",
    "set_message_id",
    "set_task_identity",
    "simulation_delivery_by_message",
    "task_identity_restored",
    "undelivered_nodes",
    "under_vmap",
    "unwrap_batched",
]
