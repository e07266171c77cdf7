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
from collections.abc import Sequence

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsim.compat import (
    RegisteredNodes,
    recorded_simulation_nodes,
    simulation_delivery_by_message,
)
from fedsim.config import EngineConfig
from fedsim.engine.known_nodes import KnownNodesGrid
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
            cfg: EngineConfig, client_ids: Sequence[int] | None = None) -> None:
    """``flwr.simulation.run_simulation`` with ``num_nodes`` virtual SuperNodes.

    ``client_ids`` (optional), the fedsim client id behind each partition id (the ClientApp's
    own mapping), lets the ServerApp's grid tell which node is which client from the
    registration Flower makes (no query message per node); without it, the nodes are asked.
    """
    from flwr.simulation import run_simulation  # imports Ray: only when this engine runs

    logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence a Ray notice
    # workers that this call starts (a local Ray) inherit the environment
    with child_environment(cfg.reuse_memory and not cfg.ray_address, os.environ), \
            TreeWatch() as started, recorded_simulation_nodes() as nodes, \
            simulation_delivery_by_message():
        if nodes is not None and client_ids is not None:
            server_app = with_recorded_nodes(server_app, nodes, client_ids)
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


def with_recorded_nodes(server_app: ServerApp, nodes: RegisteredNodes,
                        client_ids: Sequence[int]) -> ServerApp:
    """``server_app`` run on a :class:`KnownNodesGrid` over the grid Flower gives it."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server_app(KnownNodesGrid(grid, nodes, client_ids), context)

    return app
