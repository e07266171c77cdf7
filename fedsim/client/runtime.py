"""Per-process client runtime: data, model and device built once and reused per message.

Flower rebuilds a ClientApp's handlers for every message; rebuilding the dataset and the
model each time would dominate small simulations, so they are cached per scenario.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import json
import threading
from dataclasses import dataclass, field

import torch
from flwr.app import Context
from torch import nn

from fedsim.config import Scenario, scenario_from_dict
from fedsim.data.federated import FederatedData, build_federated_data
from fedsim.device import resolve_device
from fedsim.models import build_model
from fedsim.models.batched import fold_for_cohort
from fedsim.rng import derive_seed


def build_global_model(scenario: Scenario, fd: FederatedData) -> nn.Module:
    """The scenario's model, initialised from the seed (forked RNG: no global side effect)."""
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


#: Which worker's model copy the current thread uses (set by the in-process engine's
#: parallel workers; 0, the original model, everywhere else).
WORKER_SLOT: contextvars.ContextVar[int] = contextvars.ContextVar("fedsim_worker", default=0)


@dataclass
class ClientRuntime:
    """What every client message in this process shares: scenario, data, model, device.

    ``model`` is the working model of the current worker slot: slot 0 is the model built
    here; other slots (concurrent in-process workers) get their own deep copies, so clients
    trained at the same time never share parameters. The copies for ``engine.workers`` are
    made here, before any worker runs: copying a model while another thread calls it
    functionally (a cohort swaps batched tensors into its modules) would copy those.
    """

    scenario: Scenario
    data: FederatedData
    base_model: nn.Module
    device: torch.device
    _copies: dict[int, nn.Module] = field(default_factory=dict, repr=False)
    _folded: dict[int, nn.Module] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.scenario.engine.kind == "inprocess":
            for slot in range(1, self.scenario.engine.workers):
                self._copies[slot] = copy.deepcopy(self.base_model)

    @property
    def model(self) -> nn.Module:
        slot = WORKER_SLOT.get()
        if slot == 0:
            return self.base_model
        model = self._copies.get(slot)
        if model is None:
            with self._lock:
                model = self._copies.setdefault(slot, copy.deepcopy(self.base_model))
        return model

    @property
    def cohort_model(self) -> nn.Module:
        """The current worker slot's model for vmap cohorts: a copy whose norm and pooling
        layers fold the cohort into channels (:func:`fedsim.models.batched.fold_for_cohort`),
        made once per slot, so the fast path is chosen here and not on every call."""
        slot = WORKER_SLOT.get()
        model = self._folded.get(slot)
        if model is None:
            with self._lock:
                model = self._folded.setdefault(slot, fold_for_cohort(self.model))
        return model

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
    scenario = scenario_from_dict(json.loads(key))
    fd = build_federated_data(scenario)
    device = resolve_device(scenario.engine.device)
    model = build_global_model(scenario, fd).to(device)
    return ClientRuntime(scenario, fd, model, device)


_last: tuple[Scenario | None, ClientRuntime | None] = (None, None)
_build_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _runtime_with(key: str, data: FederatedData) -> ClientRuntime:
    base = _runtime(key)
    model = build_global_model(base.scenario, data).to(base.device)
    return ClientRuntime(base.scenario, data, model, base.device)


def client_runtime(scenario: Scenario, data: FederatedData | None = None) -> ClientRuntime:
    """The cached runtime for ``scenario`` in this process.

    Every message of a run carries the same Scenario object, so the last one is recognised
    by identity; only a new object pays for the JSON key (Scenario holds a dict, so it is not
    hashable), which also finds runtimes of equal scenarios built elsewhere. ``data``
    replaces the scenario's own FederatedData (same client ids; e.g. the shadow federations
    of a membership audit train each client on a subset of its pool).
    """
    global _last
    if data is not None:
        with _build_lock:
            return _runtime_with(scenario_key(scenario), data)
    cached, rt = _last
    if cached is not scenario or rt is None:
        with _build_lock:  # concurrent workers must not build two runtimes for one scenario
            rt = _runtime(scenario_key(scenario))
            _last = (scenario, rt)
    return rt
