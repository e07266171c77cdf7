"""Engines execute client updates: in-process (default), Flower's Ray simulation, or (ray
with ``engine.vectorize``) fedsim's grid with vectorized cohorts on Ray actors.

``ENGINES`` maps ``engine.kind`` to a function that runs a ServerApp against the clients of
a run (:class:`fedsim.context.RunContext`): it makes the run's client runtime and ClientApp
(and, in-process, the cohort backends sharing that runtime) and reads its ``[engine]``
section. Ray itself is imported only when the ``ray`` engine runs
(:func:`fedsim.engine.ray.run_ray`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from flwr.serverapp import ServerApp
from torch import nn

from fedsim.arrays import fast_flower_records
from fedsim.client.app import make_client_app
from fedsim.client.runtime import ClientRuntime
from fedsim.config import Scenario
from fedsim.context import RunContext
from fedsim.engine.cohort_moments import CohortMoments
from fedsim.engine.inprocess import run_inprocess
from fedsim.engine.memory import reused_memory
from fedsim.engine.ray import run_ray
from fedsim.engine.ray_check import check_ray
from fedsim.engine.ray_cohorts import run_ray_cohorts
from fedsim.engine.store import ClientStateStore
from fedsim.engine.vectorized import CohortTrainer, check_vectorize
from fedsim.engine.vectorized_eval import CohortEvaluator
from fedsim.registry import Registry

ENGINES: Registry = Registry("engine")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads (0: leave the setting alone), then restore."""
    import torch

    saved = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Leave the objects that exist before the run out of the garbage collector's scans.

    Imports alone (torch, Flower, sympy) leave a few hundred thousand long-lived objects;
    each full collection walked them all (~0.2 s, once every few hundred client updates).
    ``gc.freeze`` moves them to the permanent generation; objects made during the run are
    collected as usual. Unfrozen on exit.
    """
    import gc

    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@ENGINES.register("inprocess")
def _inprocess(server_app: ServerApp, run: RunContext) -> None:
    cfg = run.scenario.engine
    clients = ClientRuntime.for_run(run)  # one per run: the ClientApp and cohorts share it
    store = ClientStateStore(int(cfg.state_memory_mb * 2**20), cfg.state_dir or None)
    trainer = evaluator = moments = None
    if cfg.vectorize:
        trainer, evaluator = CohortTrainer(clients), CohortEvaluator(clients)
        moments = CohortMoments(clients)
    with torch_threads(cfg.threads), fast_flower_records(), frozen_gc(), \
            reused_memory(cfg.reuse_memory):
        run_inprocess(server_app, make_client_app(clients), run.scenario.num_participating,
                      state_store=store,
                      cohort_trainer=trainer, cohort_size=cfg.cohort_size,
                      workers=cfg.workers, cohort_evaluator=evaluator,
                      client_ids=run.data.participating,  # no query message per node
                      client_work=run.data.work_estimate(), cohort_moments=moments)


@ENGINES.register("ray")
def _ray(server_app: ServerApp, run: RunContext) -> None:
    # the ServerApp (aggregation) runs here; Ray's local workers get the memory settings too,
    # and the ClientApp, whose runtime each worker process builds once (shared_runtime)
    cfg = run.scenario.engine
    with fast_flower_records(), frozen_gc(), reused_memory(cfg.reuse_memory):
        if cfg.vectorize:  # fedsim's grid here, cohorts on Ray actors (engine.ray_cohorts)
            store = ClientStateStore(int(cfg.state_memory_mb * 2**20), cfg.state_dir or None)
            with torch_threads(cfg.threads):
                run_ray_cohorts(server_app, make_client_app(ClientRuntime.for_run(run)), run,
                                store)
            return
        run_ray(server_app, make_client_app(ClientRuntime.for_run(run)),
                run.scenario.num_participating, cfg,
                client_ids=run.data.participating)  # no query message per node


def check_engine_resources(scenario: Scenario) -> None:
    """Ray resources or a cluster address this machine or that cluster cannot serve
    (:func:`fedsim.engine.ray_check.check_ray`, bounded in time): the first check of
    preflight, before the run's data and model are built."""
    if scenario.engine.kind == "ray":
        check_ray(scenario.engine)


def check_engine(run: RunContext, model: nn.Module,
                 traced: dict[tuple, str | None] | None = None) -> None:
    """Engine settings that can only be checked against the model (preflight); ``model`` is
    one of ``run``'s; ``traced``: the vectorize trace outcomes already known
    (:func:`fedsim.engine.vectorized.check_vectorize`)."""
    check_vectorize(run, model, traced)
