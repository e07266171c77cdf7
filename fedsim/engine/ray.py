"""Flower's own simulation engine (Ray) running the same ServerApp and ClientApp.

Sampling by client id needs to know which node is which client. Flower's simulation engine
gives node ``i`` (a random node id) ``partition-id = i`` and the ClientApp maps partition ids
to client ids, but Flower tells the ServerApp neither. Asking every node (one ``query``
message each, what :class:`~fedsim.engine.ordered.ClientOrderedGrid` does for a grid that
does not know) costs a Ray task per node, and Flower's message loop scans every pending
message for every node, so that is quadratic: at 100,000 clients it never finished. Instead
:func:`run_ray` records the mapping Flower makes when it registers the nodes
(:func:`fedsim.compat.recorded_simulation_nodes`) and hands it, as client ids, to the grid
the ServerApp gets (:class:`fedsim.engine.known_nodes.KnownNodesGrid`): no message before
training. Flower's message loop also visits every node every 0.1 s for its next message;
:func:`fedsim.compat.simulation_delivery_by_message` makes it visit the nodes that have one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsim.compat import (
    RegisteredNodes,
    recorded_simulation_nodes,
    simulation_delivery_by_message,
    simulation_process_lost,
)
from fedsim.config import EngineConfig
from fedsim.engine.grid_proxy import DelegatingGrid
from fedsim.engine.known_nodes import KnownNodesGrid
from fedsim.engine.memory import child_environment
from fedsim.engine.processes import TreeWatch
from fedsim.errors import EngineFailed, root_cause


def backend_config(cfg: EngineConfig) -> dict:
    """Ray client resources from ``[engine]``: CPUs and GPU fraction per client actor.

    The actors' and Ray daemons' output is not forwarded to this terminal (``log_to_driver``
    off, as for Ray cohorts): a client's failure is in its error reply and ``rounds.jsonl``,
    and a lost actor ends the run with one line, not Ray's crash dumps."""
    init_args: dict = {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                       "log_to_driver": False}
    if cfg.ray_address:
        init_args = {"address": cfg.ray_address, "log_to_driver": False}
    return {
        "client_resources": {"num_cpus": cfg.ray_num_cpus, "num_gpus": cfg.client_gpus},
        "init_args": init_args,
    }


def run_ray(server_app: ServerApp, client_app: ClientApp, num_nodes: int,
            cfg: EngineConfig, client_ids: Sequence[int] | None = None) -> None:
    """``flwr.simulation.run_simulation`` with ``num_nodes`` virtual SuperNodes.

    ``client_ids`` (optional), the fedsim client id behind each partition id (the ClientApp's
    own mapping), lets the ServerApp's grid tell which node is which client from the
    registration Flower makes (no query message per node); without it, the nodes are asked.

    A failure of the simulation itself — a Ray actor or node lost (its messages come back
    as Flower's error replies), or Flower's runtime crashing while the ServerApp thread
    waits for replies — raises one :class:`~fedsim.errors.EngineFailed` within
    :data:`WAIT_SLICE` s plus :data:`JOIN_TIMEOUT` s, instead of hundreds of lines of
    Flower's logs and a wait for replies that never come (:class:`WatchedGrid`).
    """
    from flwr.simulation import run_simulation  # imports Ray: only when this engine runs

    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    # Flower logs each lost actor's traceback (for every message sent to it) at ERROR; the
    # run reports the loss once, as EngineFailed
    quiet = _BelowError()
    flwr_log.addFilter(quiet)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence a Ray notice
    watch = EngineWatch()
    # workers that this call starts (a local Ray) inherit the environment
    with child_environment(cfg.reuse_memory and not cfg.ray_address, os.environ), \
            TreeWatch() as started, recorded_simulation_nodes() as nodes, \
            simulation_delivery_by_message():
        server_app = watched_app(server_app, watch, nodes, client_ids)
        before = set(threading.enumerate())
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_nodes,
                backend_config=backend_config(cfg),
            )
        except EngineFailed:  # the ServerApp thread's, re-raised by Flower
            raise
        except Exception as exc:
            if exc is watch.server_error:  # the ServerApp's own failure, not the engine's
                raise
            # Flower's runtime ended: the ServerApp thread must stop waiting
            cause = root_cause(exc)
            watch.fail(f"Flower's Ray simulation stopped ({type(cause).__name__}: {cause})")
            _join_new_threads(before, JOIN_TIMEOUT)
            raise EngineFailed(watch.failed or "Flower's Ray simulation stopped") from exc
        finally:  # also on Ctrl-C / SIGTERM (fedsim.interrupt) and on errors
            flwr_log.removeFilter(quiet)
            shutdown_ray(started)
        if watch.failed:  # the ServerApp thread ended on it; Flower did not re-raise
            raise EngineFailed(watch.failed)


#: seconds between the ServerApp thread's looks for replies (and for a failed engine)
WAIT_SLICE = 0.1
#: seconds the ServerApp thread gets to end (its checkpoint writer closes) once the
#: simulation under it has failed
JOIN_TIMEOUT = 10.0


class _BelowError(logging.Filter):
    """Lets Flower's warnings through, not its error logs (what failed is raised instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


class EngineWatch:
    """The first failure of a simulation, shared by the thread that runs Flower's runtime and
    the ServerApp thread's grid (:class:`WatchedGrid`): whichever sees it first says why."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.failed: str | None = None
        #: what the ServerApp itself raised, if it did (Flower re-raises it as it is)
        self.server_error: BaseException | None = None

    def fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
        self._event.set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True at once if the simulation has failed."""
        return self._event.wait(seconds)


class WatchedGrid(DelegatingGrid):
    """Flower's simulation grid, waiting for replies in slices of :data:`WAIT_SLICE` s.

    It raises :class:`~fedsim.errors.EngineFailed` at its next call, or within a slice while
    it waits, once the simulation has failed (:class:`EngineWatch`), and when a reply says a
    Ray actor or node died
    (:func:`fedsim.compat.simulation_process_lost`): Flower's actor pool keeps a dead actor,
    so every later message sent to it would fail too. Flower's own ``send_and_receive``
    waits the whole timeout (an hour) for replies a crashed runtime never sends.
    """

    def __init__(self, base: Grid, watch: EngineWatch) -> None:
        super().__init__(base)
        self.watch = watch

    def _check(self) -> None:
        if self.watch.failed is not None:
            raise EngineFailed(self.watch.failed)

    def get_node_ids(self) -> Iterable[int]:
        self._check()  # a caller waiting for nodes to register asks again and again
        return super().get_node_ids()

    def pull_messages(self, reply_to_message_ids=None, *, message_ids=None):
        self._check()  # a caller polling for replies (ClientOrderedGrid) stops here
        replies = list(super().pull_messages(reply_to_message_ids, message_ids=message_ids))
        for reply in replies:
            if (lost := simulation_process_lost(reply)) is not None:
                self.watch.fail(f"a Ray process of the simulation died ({lost})")
                raise EngineFailed(self.watch.failed)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            got = self.pull_messages(list(waiting))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (deadline is not None and time.monotonic() > deadline):
                break
            if self.watch.wait(WAIT_SLICE):
                raise EngineFailed(self.watch.failed or "the simulation failed")
        return replies


def watched_app(server_app: ServerApp, watch: EngineWatch, nodes: RegisteredNodes | None,
                client_ids: Sequence[int] | None) -> ServerApp:
    """``server_app`` run on a :class:`WatchedGrid` over the grid Flower gives it, seen as a
    :class:`KnownNodesGrid` when the nodes' registration was recorded."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        grid = WatchedGrid(grid, watch)
        if nodes is not None and client_ids is not None:
            grid = KnownNodesGrid(grid, nodes, client_ids)
        try:
            server_app(grid, context)
        except BaseException as exc:
            watch.server_error = exc
            raise

    return app


def _join_new_threads(before: set[threading.Thread], timeout: float) -> None:
    """Wait up to ``timeout`` s for the non-daemon threads started since ``before`` (the
    ServerApp thread) to end."""
    deadline = time.monotonic() + timeout
    for t in set(threading.enumerate()) - before:
        if not t.daemon and t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))


def shutdown_ray(started: TreeWatch) -> None:
    """Disconnect from Ray (Flower does on a normal end; an interrupt can skip it) and stop
    the local Ray processes this run started that are still there: ``ray.shutdown`` leaves
    its workers to exit on their own, some seconds later."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    started.stop()
