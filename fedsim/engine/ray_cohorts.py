"""Vectorized cohorts on Ray actors: ``engine.kind = "ray"`` with ``engine.vectorize = true``.

The ServerApp, its strategy and fedsim's own Grid (:class:`RayCohortGrid`, the in-process
grid) run in this process, the driver: node ids, client sampling and the client-state store
are exactly the in-process engine's. Only the execution differs: each pull's train and
evaluate messages (and the BN-moment queries of ``server.bn_statistics = "recalibrate"``) are
split into cohorts (at most ``engine.cohort_size`` clients, a multiple of the actor count,
of equal work where the clients' sizes are known: the in-process grid's split) and handed to
``engine.ray_workers`` long-lived Ray actors
(:class:`CohortWorker`, ``engine.ray_num_cpus`` CPUs and ``engine.client_gpus`` GPU each).
An actor builds the run's :class:`~fedsim.client.runtime.ClientRuntime` once, from the
scenario's plain dict (never a pickled runtime or model), and answers a cohort with the same
:class:`~fedsim.engine.vectorized.CohortTrainer` /
:class:`~fedsim.engine.vectorized_eval.CohortEvaluator` as the in-process engine: one reply
per message, every client with its own hooks and ``Context.state``.

**On the wire**, a cohort's task and its result each cross as one ``bytes`` object, Flower's
``Message`` objects pickled with plain :mod:`pickle` (:func:`to_wire`), which Ray passes
through as it is. Handed the objects themselves, Ray's own serializer treats each of a
cohort's hundreds of small arrays as a separate out-of-band buffer, which costs more than
one pickle each way (benchmarks/RESULTS.md, "Cohort on the wire as bytes").

**Client state travels with the message.** The driver's
:class:`~fedsim.engine.store.ClientStateStore` stays the one store: a cohort carries its
clients' stored state bytes to the actor, which decodes them into each client's Context and
sends the updated state back, encoded, with the replies; the driver writes it back only for
successful replies (as in-process, a failing client keeps its previous state). Why not a
store every actor reaches: cohorts are assigned to actors per pull, so a client lands on any
actor from round to round; one store in the driver keeps its memory budget, spill folder,
checkpoints and bitwise resume exactly as they are; and there is no shared store to run or
to keep consistent when an actor dies. The cost is the state's bytes twice per update.

**Failures.** Simulated failures (``[failures]``) are decided by the server and carried in
the train config, so they play out in the actors as anywhere else. An actor that dies
(killed, out of memory) is reported in the log, replaced by a fresh one, and every message of
its cohorts gets an error reply naming it; the server then records those clients'
failures and retries the round per ``[failures]`` (``min_replies``, ``on_too_few``,
``retries``), as for any other failed clients. A replacement that does not start within
:data:`RESTART_TIMEOUT` s (its node is gone too) ends the run with
:class:`~fedsim.errors.EngineFailed`. The driver waits on replies in short slices,
so Ctrl-C and SIGTERM are seen at once (:mod:`fedsim.interrupt`).

Ray is imported only when this engine runs.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import gc
import logging
import math
import os
import pickle
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Message, MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedsim import compat
from fedsim.arrays import fast_flower_records
from fedsim.client.messages import BN_MOMENTS, error_reply
from fedsim.client.runtime import ClientRuntime
from fedsim.config import EngineConfig, Scenario, scenario_from_dict
from fedsim.context import RunContext
from fedsim.engine.cohort_moments import CohortMoments
from fedsim.engine.inprocess import InProcessGrid, answer_cohort, serve
from fedsim.engine.memory import child_environment
from fedsim.engine.processes import TreeWatch
from fedsim.engine.ray import backend_config
from fedsim.engine.ray_check import check_ray, check_resources
from fedsim.engine.store import ClientStateStore
from fedsim.engine.vectorized import CohortTrainer
from fedsim.engine.vectorized_eval import CohortEvaluator
from fedsim.errors import EngineFailed, ScenarioError

log = logging.getLogger("fedsim")

#: seconds to wait for the actors to start (they build the run's data and model)
START_TIMEOUT = 600.0
#: seconds a replacement for an actor that died gets to start (its node may be gone too:
#: then the run ends with EngineFailed rather than wait START_TIMEOUT)
RESTART_TIMEOUT = 120.0
#: seconds per wait for replies (a wait in Python: signals are handled at once anyway)
WAIT_SLICE = 0.2
COHORT_KINDS = (MessageType.TRAIN, MessageType.EVALUATE, BN_MOMENTS)
#: seconds between the driver's background looks for Ray's processes (engine.processes.
#: TreeWatch); it also looks whenever actors have started and before Ray shuts down. Each
#: look reads /proc for every process, which slowed the actors measurably at 1 s
#: (benchmarks/RESULTS.md, "Watching Ray's processes")
WATCH_INTERVAL = 30.0
#: bytes up to which a cohort's results (and its task) travel inline in Ray's own messages
#: rather than through its shared-memory object store (Ray's default: 100 KiB). A cohort of
#: 50 small-model replies is 0.3–0.6 MB; inline, the driver holds it ~2 ms sooner per round
#: (benchmarks/RESULTS.md, "Cohort results inline"). Larger
#: results (big models, big cohorts) still go through the object store, so no message grows
#: past this.
INLINE_RESULT_BYTES = 4 * 1024 * 1024
#: a local Ray's settings, inherited by its daemons and workers:
#: - it starts its workers at nice 15, so they never starve its own daemons; here the actors
#:   do the run's computation, so they run at the driver's priority (as the in-process engine
#:   does): on a busy machine nice-15 actors get a fraction of a core each;
#: - cohort results inline up to :data:`INLINE_RESULT_BYTES`.
#: A cluster (``engine.ray_address``) keeps its own settings.
LOCAL_RAY_ENV = {"RAY_worker_niceness": "0",
                 "RAY_max_direct_call_object_size": str(INLINE_RESULT_BYTES)}


# --------------------------------------------------------------------------- checks


def check_ray_cohorts(scenario: Scenario, cpus: int | None = None) -> None:
    """Refuse settings under which a local Ray could never place the actors (they would
    wait forever): more CPUs or GPUs than this machine has (``cpus``: its CPU count, by
    default ``os.cpu_count()``). A cluster (``engine.ray_address``) is asked by
    :func:`fedsim.engine.ray_check.check_ray`, which preflight calls for every Ray run."""
    if not scenario.engine.ray_address:
        check_ray(scenario.engine, local_cpus=cpus)


def cohort_sizes(n: int, workers: int, max_size: int) -> list[int]:
    """Sizes of the cohorts ``n`` messages of one kind are split into, in message order:
    as equal as possible, at most ``max_size`` each, and a multiple of ``workers`` cohorts
    (where there are that many messages) so every actor gets the same share."""
    if n <= 0:
        return []
    k = workers * math.ceil(math.ceil(n / max_size) / workers)
    k = min(k, n)
    base, extra = divmod(n, k)
    return [base + (i < extra) for i in range(k)]


# --------------------------------------------------------------------------- actor side


@dataclass(frozen=True)
class CohortTask:
    """One cohort as it crosses to an actor: the messages, and for each its node id and
    stored state bytes (None: no state); the Context fields every node shares."""

    kind: str
    messages: list[Message]
    nodes: list[int]
    states: list[bytes | None]
    run_id: int
    num_nodes: int
    run_config: dict


class CohortWorker:
    """What one actor runs: the run's client runtime and cohort backends, built once.

    A plain class (so importing this module imports no Ray); :class:`CohortPool` makes it a
    Ray actor. Answers a :class:`CohortTask` with, per message, its reply and (successful
    replies only) the client's new state bytes (``b""``: no state).
    """

    def __init__(self, scenario: dict, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        logging.getLogger("flwr").setLevel(logging.WARNING)
        runtime = ClientRuntime.for_run(RunContext.build(scenario_from_dict(scenario)))
        self._handlers = {MessageType.TRAIN: CohortTrainer(runtime),
                          MessageType.EVALUATE: CohortEvaluator(runtime),
                          BN_MOMENTS: CohortMoments(runtime)}
        gc.freeze()  # the runtime, data and imports: long-lived (fedsim.engine.frozen_gc)

    def pid(self) -> int:
        return os.getpid()

    def run_wire(self, task: bytes) -> bytes:
        """:meth:`run` with its task and its result on the wire (:func:`to_wire`)."""
        return to_wire(self.run(from_wire(task)))

    def run(self, task: CohortTask) -> list[tuple[Message, bytes | None]]:
        with fast_flower_records():
            return answer_cohort(self._handlers[task.kind], task.messages, task.nodes,
                                 task.states, task.run_id, task.num_nodes, task.run_config)


def to_wire(obj: Any) -> bytes:
    """``obj`` as the bytes a cohort's task or result crosses between processes in (module
    docstring, "On the wire"); :func:`from_wire` reads them back."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def from_wire(data: bytes) -> Any:
    """What :func:`to_wire` wrote: bytes from fedsim's own actors or driver, the same trust
    as Ray's own unpickling of task arguments and results."""
    return pickle.loads(data)


# --------------------------------------------------------------------------- driver side


def _wait(futures, timeout: float, until: str) -> tuple[set, set]:
    """``concurrent.futures.wait`` on Ray results (``ObjectRef.future()``), in slices.

    Waiting in Python, not in ``ray.wait``, keeps Ctrl-C and SIGTERM fedsim's: ``ray.wait``
    runs signal handlers inside its C++ loop and replaces the :class:`fedsim.interrupt.
    Interrupted` they raise by a bare ``KeyboardInterrupt`` (no signal, no exit code).
    """
    deadline = time.monotonic() + timeout
    waiting = set(futures)
    done: set = set()
    while waiting:
        got, waiting = cf.wait(waiting, timeout=min(WAIT_SLICE, timeout), return_when=until)
        done |= got
        if (got and until == cf.FIRST_COMPLETED) or time.monotonic() > deadline:
            break
    return done, waiting


class ActorLost(RuntimeError):
    """A Ray actor died while it held a client's cohort (the client's error reply says so)."""


class CohortPool:
    """``engine.ray_workers`` :class:`CohortWorker` actors and the cohorts in flight on them.

    Task ``i`` of a :meth:`run` call goes to actor ``(i + offset) mod workers``: a fixed
    assignment, so a run is reproducible, and with the grid's offset moving on every pull a
    client trains on different actors over the rounds (its state travels with it).
    """

    def __init__(self, scenario: Scenario) -> None:
        cfg = scenario.engine
        self.cfg = cfg
        self._scenario = scenario.to_dict()
        self._threads = max(1, int(cfg.ray_num_cpus))
        self.actors: list[Any] = []
        self.pids: list[int] = []
        self.generation: list[int] = []  # actor k's restarts so far
        self.started_ray = False
        #: called whenever actors have started (the run's process watch notes them)
        self.on_started: Callable[[], None] = lambda: None

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> CohortPool:
        """Start (or join, with ``engine.ray_address``) Ray and the actors; wait until every
        actor has built its runtime."""
        import ray

        if not ray.is_initialized():
            ray.init(**{**backend_config(self.cfg)["init_args"], "log_to_driver": False},
                     configure_logging=False)
            self.started_ray = True
        self._check_resources()
        self._remote = ray.remote(num_cpus=self.cfg.ray_num_cpus, num_gpus=self.cfg.client_gpus,
                                  max_restarts=0, max_task_retries=0)(CohortWorker)
        self.actors = [self._new_actor() for _ in range(self.cfg.ray_workers)]
        self.generation = [0] * len(self.actors)
        self.pids = self._wait_ready(self.actors)
        self.on_started()
        return self

    def _check_resources(self) -> None:
        """The cluster Ray joined can place the actors (preflight asked already; a cluster
        can shrink in between)."""
        import ray

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        where = f"the Ray cluster at {self.cfg.ray_address}" if self.cfg.ray_address else "Ray"
        check_resources(self.cfg, nodes, where)

    def _new_actor(self) -> Any:
        return self._remote.remote(self._scenario, self._threads)

    def _wait_ready(self, actors: list, timeout: float = START_TIMEOUT,
                    error: type[Exception] = ScenarioError) -> list[int]:
        """The actors' pids once each has built its runtime; ``error`` (ScenarioError before
        the run, EngineFailed for a replacement mid-run) when one has not within
        ``timeout`` s or failed."""
        import ray

        futures = [a.pid.remote().future() for a in actors]
        _, waiting = _wait(futures, timeout, cf.ALL_COMPLETED)
        if waiting:
            raise error(
                f"{len(waiting)} of {len(futures)} Ray cohort actors did not start "
                f"within {timeout:g} s (engine.ray_workers = {self.cfg.ray_workers}); "
                "check that Ray can place them")
        try:
            return [f.result() for f in futures]
        except ray.exceptions.RayError as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise error(f"a Ray cohort actor failed while building the run's clients "
                        f"({type(exc).__name__}: {first})") from exc

    def close(self) -> None:
        """Stop the actors, and Ray itself where this pool started it."""
        import ray

        for actor in self.actors:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(actor, no_restart=True)
        self.actors = []
        if self.started_ray and ray.is_initialized():
            ray.shutdown()

    # -- cohorts ---------------------------------------------------------------------
    def _submit(self, k: int, task: CohortTask) -> Any:
        """Hand ``task`` to actor ``k``; its result's Ray object reference."""
        return self.actors[k].run_wire.remote(to_wire(task))

    def run(self, tasks: Sequence[CohortTask], offset: int = 0
            ) -> list[list[tuple[Message, bytes | None]]]:
        """Every task's per-message (reply, state bytes), in task order. An actor that dies
        is replaced; the messages of its tasks get error replies (:class:`ActorLost`)."""
        import ray

        n = len(self.actors)
        sent = []
        for i, task in enumerate(tasks):
            k = (i + offset) % n
            sent.append((k, self.generation[k], self._submit(k, task).future()))
        results: list = [None] * len(tasks)
        index = {future: i for i, (_, _, future) in enumerate(sent)}
        waiting = set(index)
        while waiting:
            done, waiting = _wait(waiting, WAIT_SLICE, cf.FIRST_COMPLETED)
            for future in sorted(done, key=index.__getitem__):
                i = index[future]
                k, gen, _ = sent[i]
                try:
                    results[i] = from_wire(future.result())
                except ray.exceptions.RayActorError as exc:
                    results[i] = self._lost(k, gen, tasks[i], exc)
                except ray.exceptions.RayError as exc:  # e.g. a task that could not unpickle
                    results[i] = [(error_reply(m, exc), None) for m in tasks[i].messages]
        return results

    def _lost(self, k: int, gen: int, task: CohortTask, cause: Exception
              ) -> list[tuple[Message, None]]:
        exc = ActorLost(f"Ray cohort actor {k} (pid {self.pids[k]}) died while training this "
                        f"client's cohort of {len(task.messages)}; it was restarted "
                        f"({type(cause).__name__})")
        if self.generation[k] == gen:  # first news of this death: replace the actor
            import ray

            log.warning("Ray cohort actor %d (pid %d) died during a cohort of %d clients (%s); "
                        "restarting it. Its clients get error replies and [failures] decides "
                        "whether the round is retried", k, self.pids[k], len(task.messages),
                        type(cause).__name__)
            with contextlib.suppress(Exception):
                ray.kill(self.actors[k], no_restart=True)
            self.actors[k] = self._new_actor()
            self.generation[k] += 1
            self.pids[k] = self._wait_ready([self.actors[k]], RESTART_TIMEOUT,
                                            EngineFailed)[0]
            self.on_started()
        return [(error_reply(m, exc), None) for m in task.messages]


class RayCohortGrid(InProcessGrid):
    """The in-process grid whose train and evaluate cohorts run on a :class:`CohortPool`.

    Everything else — node ids, Contexts, the state store, single messages (query) run by the
    local ``client_app`` — is :class:`InProcessGrid`'s; see the module docstring for why
    state travels with the message.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, pool: CohortPool,
                 state_store: ClientStateStore, cohort_size: int = 128,
                 client_ids: Sequence[int] | None = None,
                 client_work: Callable[[int], float] | None = None) -> None:
        # the handlers only mark which kinds run as cohorts: _run_jobs sends those to the pool
        super().__init__(client_app, num_nodes, state_store=state_store,
                         cohort_trainer=self._remote_only, cohort_evaluator=self._remote_only,
                         cohort_size=cohort_size, client_ids=client_ids,
                         client_work=client_work, cohort_moments=self._remote_only)
        self.pool = pool
        self._pulls = 0

    @staticmethod
    def _remote_only(msgs, contexts):  # pragma: no cover - never called
        raise RuntimeError("Ray cohorts run on the actors, not in the driver")

    def _cohort_sizes(self, n: int) -> list[int]:
        return cohort_sizes(n, len(self.pool.actors) or 1, self.cohort_size)

    def _run_jobs(self, jobs: list) -> list[dict[str, Message]]:
        cohorts = [j for j in jobs if j[0][1].metadata.message_type in COHORT_KINDS]
        singles = [j for j in jobs if j[0][1].metadata.message_type not in COHORT_KINDS]
        out = [self._do(job) for job in singles]
        if not cohorts:
            return out
        tasks = [self._task(job) for job in cohorts]
        self._pulls += 1
        for job, answers in zip(cohorts, self.pool.run(tasks, offset=self._pulls - 1)):
            replies = {}
            for (mid, msg), (reply, state) in zip(job, answers):
                if not reply.has_error():
                    node = msg.metadata.dst_node_id
                    self.state_store.put_raw(node, state)
                compat.set_message_id(reply, uuid.uuid4().hex)
                replies[mid] = reply
            out.append(replies)
        return out

    def _task(self, job: list[tuple[str, Message]]) -> CohortTask:
        msgs = [m for _, m in job]
        nodes = [m.metadata.dst_node_id for m in msgs]
        return CohortTask(msgs[0].metadata.message_type, msgs, nodes,
                          [self.state_store.raw(n) for n in nodes], self.run.run_id,
                          self._num_nodes, self._run_config)


def run_ray_cohorts(server_app: ServerApp, client_app: ClientApp, run: RunContext,
                    state_store: ClientStateStore) -> None:
    """Run ``server_app`` with its clients' cohorts on Ray actors (module docstring); the
    actors, and a local Ray this run started, are stopped at the end, on errors and on
    Ctrl-C / SIGTERM."""
    cfg: EngineConfig = run.scenario.engine
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence a Ray notice
    pool = CohortPool(run.scenario)
    local = not cfg.ray_address
    with child_environment(cfg.reuse_memory and local, os.environ), \
            _environment(LOCAL_RAY_ENV if local else {}), TreeWatch(WATCH_INTERVAL) as started:
        pool.on_started = started.note
        try:
            pool.start()
            grid = RayCohortGrid(client_app, run.scenario.num_participating, pool, state_store,
                                 cohort_size=cfg.cohort_size, client_ids=run.data.participating,
                                 client_work=run.data.work_estimate())
            serve(server_app, grid)
        finally:
            started.note()  # Ray's workers outlive its shutdown: note them while attached
            pool.close()
            if pool.started_ray:  # a local Ray's workers outlive ray.shutdown for a while
                started.stop()


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` where not already set (a local Ray's processes inherit
    them when they start), removed again afterwards."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)
