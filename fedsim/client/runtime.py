"""The client side of a run: its settings, data, working models and device, built once.

A :class:`ClientRuntime` is made from the run's :class:`fedsim.context.RunContext` and
handed to everything that runs clients — the ClientApp's handlers (one client at a time)
and the cohort backends (:mod:`fedsim.engine.vectorized`,
:mod:`fedsim.engine.vectorized_eval`) — which read only their own section of the scenario
(:class:`ClientSettings`), never the whole Scenario.

Flower rebuilds the ClientApp for every message where it runs in other processes: Ray
unpickles the app for each task, and the Deployment Engine loads it from the run config.
There a runtime is found again through :func:`shared_runtime`, this module's one
per-process cache, keyed by the run's scenario.
"""

from __future__ import annotations

import contextvars
import copy
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from flwr.app import Context
from torch import nn

from fedsim import canaries
from fedsim.client.step import GlobalArrays
from fedsim.config import ClientConfig, Scenario
from fedsim.context import RunContext
from fedsim.data.federated import FederatedData, build_federated_data
from fedsim.device import DeviceSplits
from fedsim.models.batched import fold_for_cohort
from fedsim.models.norm import index_norm_layers, uses_batch_statistics

#: Which worker's model copy the current thread uses (set by the in-process engine's
#: parallel workers; 0, the original model, everywhere else).
WORKER_SLOT: contextvars.ContextVar[int] = contextvars.ContextVar("fedsim_worker", default=0)


@dataclass(frozen=True)
class ClientSettings:
    """The part of a scenario the client computation reads.

    ``batch_statistics``: the norm normalises with batch statistics (local training drops
    batches of one sample; DP-SGD is refused). ``rounds``: DP-SGD calibrates its noise to the
    run's length. ``strategy``: its module registers the client hooks train configs name.
    ``bn_eval``: ``model.bn_eval``, how evaluation normalises with BN layers.
    ``canary_samples``: gradient canaries a one-run audit inserts into DP-SGD
    (:mod:`fedsim.canaries`).
    Failures are decided by the server (:mod:`fedsim.client.failures`): a client only sees
    the crash its train config asks for, so ``[failures]`` is not part of this section.
    """

    client: ClientConfig
    seed: int
    rounds: int
    norm: str
    batch_statistics: bool
    strategy: str
    bn_eval: str = "running"
    canary_samples: int = 0  # gradient canaries among the clients (0: none)

    @classmethod
    def of(cls, scenario: Scenario) -> ClientSettings:
        return cls(scenario.client, scenario.seed, scenario.server.rounds, scenario.model.norm,
                   uses_batch_statistics(scenario.model.norm), scenario.server.strategy,
                   scenario.model.bn_eval, scenario.privacy.sample_canaries)


@dataclass
class ClientRuntime:
    """What every client message of a run shares in this process: settings, data, models.

    ``model`` is the working model of the current worker slot: slot 0 is ``base_model``;
    other slots (concurrent in-process workers, ``workers`` > 1) get their own deep copies,
    so clients trained at the same time never share parameters. The copies are made here,
    before any worker runs: copying a model while another thread calls it functionally (a
    cohort swaps batched tensors into its modules) would copy those.

    A runtime pickles as its run's scenario and is found again (or built once) in the
    receiving process by :func:`shared_runtime`; one over substituted data (a shadow
    federation) runs in-process only.
    """

    settings: ClientSettings
    data: FederatedData
    base_model: nn.Module
    device: torch.device
    workers: int = 1
    origin: Scenario | None = field(default=None, repr=False)  # what a pickle carries
    _copies: dict[int, nn.Module] = field(default_factory=dict, repr=False)
    _folded: dict[int, nn.Module] = field(default_factory=dict, repr=False)
    _received: dict[int, GlobalArrays] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    on_device: DeviceSplits | None = field(default=None, repr=False)  # the run's, if shared

    def __post_init__(self) -> None:
        for slot in range(1, self.workers):
            self._copies[slot] = copy.deepcopy(self.base_model)

    @classmethod
    def for_run(cls, run: RunContext) -> ClientRuntime:
        """The client runtime of ``run``: a fresh initial model on the run's device, and a
        copy per in-process worker (``engine.workers``)."""
        engine = run.scenario.engine
        workers = engine.workers if engine.kind == "inprocess" else 1
        return cls(ClientSettings.of(run.scenario), run.data, run.new_model().to(run.device),
                   run.device, workers, origin=run.scenario, on_device=run.on_device)

    def __reduce__(self):
        if self.origin is None or self.data is not build_federated_data(self.origin):
            raise TypeError("a client runtime over substituted data (a shadow federation) "
                            "runs in-process only; it cannot be sent to another process")
        return shared_runtime, (self.origin,)

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
        made once per slot, so the fast path is chosen here and not on every call. Its
        structure is fixed from then on, so its norm layers are indexed once
        (:func:`fedsim.models.norm.index_norm_layers`: the keys FedBN-like hooks ask for per
        client)."""
        slot = WORKER_SLOT.get()
        model = self._folded.get(slot)
        if model is None:
            with self._lock:
                model = self._folded.get(slot)
                if model is None:
                    model = fold_for_cohort(self.model)
                    index_norm_layers(model)
                    self._folded[slot] = model
        return model

    @property
    def global_arrays(self) -> GlobalArrays:
        """The current worker slot's received arrays, decoded into its model's layout once
        per record (:class:`fedsim.client.step.GlobalArrays`): what one-at-a-time clients
        start from."""
        slot = WORKER_SLOT.get()
        held = self._received.get(slot)
        if held is None:
            held = self._received[slot] = GlobalArrays(self.model)
        return held

    def client_train(self, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``cid``'s training data on the run's device, copied there once per run
        (:class:`fedsim.device.DeviceSplits`, shared with the server's evaluation)."""
        return self._device_splits().client_train(cid)

    def client_test(self, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``cid``'s local test data on the run's device, copied there once per run."""
        return self._device_splits().client_test(cid)

    def _device_splits(self) -> DeviceSplits:
        if self.on_device is None:
            with self._lock:
                if self.on_device is None:
                    self.on_device = DeviceSplits(self.data, self.device)
        return self.on_device

    def canaries(self, cid: int) -> torch.Tensor | None:
        """The directions ``(k, dim)`` of the gradient canaries client ``cid`` trains with
        (its *in* ones; :mod:`fedsim.canaries`), on the run's device; None if none."""
        count = self.settings.canary_samples
        if count == 0:
            return None
        mine = canaries.held_by(cid, count, self.data.participating, self.settings.seed)
        if not mine.size:
            return None
        dim = canaries.parameter_size(self.base_model)
        return torch.as_tensor(canaries.unit_directions(dim, self.settings.seed,
                                                        canaries.SAMPLE, mine),
                               device=self.device)

    def client_id(self, context: Context) -> int:
        """Map Flower's ``partition-id`` (0..participating-1) to a fedsim client id."""
        pid = int(context.node_config["partition-id"])
        if not 0 <= pid < len(self.data.participating):
            raise ValueError(
                f"partition-id {pid} is outside 0..{len(self.data.participating) - 1}: this "
                "federation has that many participating clients"
            )
        return self.data.participating[pid]


_SHARED: OrderedDict[str, ClientRuntime] = OrderedDict()
_SHARED_MAX = 4  # runs whose runtimes a process keeps (a sweep on Ray moves on run by run)
_SHARED_LOCK = threading.Lock()


def shared_runtime(scenario: Scenario) -> ClientRuntime:
    """This process's client runtime of ``scenario``'s run, built on first use.

    The one per-process cache of a run's parts, for where Flower rebuilds the ClientApp per
    message in another process (Ray workers, the Deployment Engine's app processes):
    rebuilding the data and model per message would dominate small runs. Keyed by the
    scenario's content (a Scenario holds dicts, so it is not hashable); the in-process
    engine never needs it (the runner's one RunContext reaches the ClientApp directly).
    """
    key = json.dumps(scenario.to_dict(), sort_keys=True, default=str)
    with _SHARED_LOCK:  # concurrent workers must not build two runtimes for one run
        rt = _SHARED.get(key)
        if rt is None:
            rt = _SHARED[key] = ClientRuntime.for_run(RunContext.build(scenario))
            while len(_SHARED) > _SHARED_MAX:
                _SHARED.popitem(last=False)
        return rt
