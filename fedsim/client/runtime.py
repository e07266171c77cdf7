"""Per-process client runtime: data, model and device built once and reused per message.

Flower rebuilds a ClientApp's handlers for every message; rebuilding the dataset and the
model each time would dominate small simulations, so they are cached per scenario.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch
from flwr.app import Context
from torch import nn

from fedsim.config import Scenario
from fedsim.data.federated import FederatedData, build_federated_data
from fedsim.device import resolve_device
from fedsim.models import build_model


def build_global_model(scenario: Scenario, fd: FederatedData) -> nn.Module:
    """The scenario's model, initialised from the seed (forked RNG: no global side effect)."""
    from fedsim.rng import derive_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(scenario.seed, "init"))
        c, h, _ = fd.input_shape
        return build_model(
            scenario.model.arch,
            scenario.model.norm,
            in_channels=c,
            image_size=h,
            num_classes=fd.num_classes,
            width=scenario.model.width,
            groups=scenario.model.groups,
            hybrid_init=scenario.model.hybrid_init,
        )


@dataclass
class ClientRuntime:
    scenario: Scenario
    data: FederatedData
    model: nn.Module
    device: torch.device

    def client_id(self, context: Context) -> int:
        """Map Flower's ``partition-id`` (0..participating-1) to a fedsim client id."""
        pid = int(context.node_config["partition-id"])
        if not 0 <= pid < len(self.data.participating):
            raise ValueError(
                f"partition-id {pid} is outside 0..{len(self.data.participating) - 1}: this "
                "federation has that many participating clients"
            )
        return self.data.participating[pid]


def scenario_key(scenario: Scenario) -> str:
    return json.dumps(scenario.to_dict(), sort_keys=True, default=str)


@functools.lru_cache(maxsize=4)
def _runtime(key: str) -> ClientRuntime:
    from fedsim.config import scenario_from_dict

    scenario = scenario_from_dict(json.loads(key))
    fd = build_federated_data(scenario)
    device = resolve_device(scenario.engine.device)
    model = build_global_model(scenario, fd).to(device)
    return ClientRuntime(scenario, fd, model, device)


@functools.lru_cache(maxsize=4)
def _runtime_with(key: str, data: FederatedData) -> ClientRuntime:
    base = _runtime(key)
    model = build_global_model(base.scenario, data).to(base.device)
    return ClientRuntime(base.scenario, data, model, base.device)


def client_runtime(scenario: Scenario, data: FederatedData | None = None) -> ClientRuntime:
    """The cached runtime for ``scenario`` in this process.

    ``data`` replaces the scenario's own FederatedData (same client ids; e.g. the shadow
    federations of a membership audit train each client on a subset of its pool).
    """
    if data is None:
        return _runtime(scenario_key(scenario))
    return _runtime_with(scenario_key(scenario), data)
