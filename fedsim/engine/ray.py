"""Flower's own simulation engine (Ray) running the same ServerApp and ClientApp."""

from __future__ import annotations

import logging
import os

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedsim.config import EngineConfig
from fedsim.engine.memory import child_environment
from fedsim.engine.processes import TreeWatch


def backend_config(cfg: EngineConfig) -> dict:
    """Ray client resources from ``[engine]``: CPUs and GPU fraction per client actor."""
    init_args: dict = {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}
    if cfg.ray_address:
        init_args = {"address": cfg.ray_address}
    return {
        "client_resources": {"num_cpus": cfg.ray_num_cpus, "num_gpus": cfg.client_gpus},
        "init_args": init_args,
    }


def run_ray(server_app: ServerApp, client_app: ClientApp, num_nodes: int,
            cfg: EngineConfig) -> None:
    """``flwr.simulation.run_simulation`` with ``num_nodes`` virtual SuperNodes."""
    from flwr.simulation import run_simulation  # imports Ray: only when this engine runs

    logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence a Ray notice
    # workers that this call starts (a local Ray) inherit the environment
    with child_environment(cfg.reuse_memory and not cfg.ray_address, os.environ), \
            TreeWatch() as started:
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_nodes,
                backend_config=backend_config(cfg),
            )
        finally:  # also on Ctrl-C / SIGTERM (fedsim.interrupt) and on errors
            shutdown_ray(started)


def shutdown_ray(started: TreeWatch) -> None:
    """Disconnect from Ray (Flower does on a normal end; an interrupt can skip it) and stop
    the local Ray processes this run started that are still there: ``ray.shutdown`` leaves
    its workers to exit on their own, some seconds later."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    started.stop()
