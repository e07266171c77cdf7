"""Engines execute client updates: in-process (default) or Flower's Ray simulation."""

from __future__ import annotations

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedsim.config import Scenario
from fedsim.registry import Registry

ENGINES: Registry = Registry("engine")


@ENGINES.register("inprocess")
def _inprocess(server_app: ServerApp, client_app: ClientApp, scenario: Scenario) -> None:
    from fedsim.engine.inprocess import run_inprocess

    run_inprocess(server_app, client_app, scenario.num_participating)


@ENGINES.register("ray")
def _ray(server_app: ServerApp, client_app: ClientApp, scenario: Scenario) -> None:
    from fedsim.engine.ray import run_ray

    run_ray(server_app, client_app, scenario.num_participating, scenario.engine)
