"""The run context: what one run builds once and every part of it shares.

A scenario is parsed once (:mod:`fedsim.config`) and its names checked at the edge
(:mod:`fedsim.run`); the runner then builds one :class:`RunContext` — the checked Scenario,
its FederatedData, the device and the seeded model factory — and hands it to the server
(which makes the strategy from the scenario and a model of the factory), the engine and the
client runtime (:class:`fedsim.client.runtime.ClientRuntime`). Nothing downstream rebuilds
data or models from a Scenario.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fedsim.config import Scenario
from fedsim.data.federated import FederatedData, build_federated_data
from fedsim.device import DeviceSplits, resolve_device
from fedsim.errors import ScenarioError
from fedsim.models import ARCHS, build_model, input_kind
from fedsim.rng import derive_seed


def build_global_model(scenario: Scenario, fd: FederatedData) -> nn.Module:
    """The scenario's model, initialised from the seed (forked RNG: no global side effect).

    Raises ScenarioError when the arch reads other inputs than the data holds (an image
    arch on token windows, or the reverse)."""
    m = scenario.model
    kind = input_kind(m.arch)
    if kind != fd.input_kind:
        fits = ", ".join(repr(a) for a in ARCHS.names() if input_kind(a) == fd.input_kind)
        raise ScenarioError(
            f"model.arch = {m.arch!r} reads {_INPUTS[kind]}, but data.name = {fd.name!r} "
            f"holds {_INPUTS[fd.input_kind]}; use model.arch = one of {fits}")
    shape = dict(vocab_size=fd.num_classes, seq_len=fd.input_shape[0]) if kind == "tokens" \
        else dict(in_channels=fd.input_shape[0], image_size=fd.input_shape[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(scenario.seed, "init"))
        return build_model(m.arch, m.norm, num_classes=fd.num_classes, width=m.width,
                           groups=m.groups, hybrid_init=m.hybrid_init, layers=m.layers,
                           **shape)


_INPUTS = {"image": "images", "tokens": "token windows (text)"}


@dataclass(frozen=True)
class RunContext:
    """One run's shared parts, built once per run (per process on Ray and the Deployment
    Engine, see :func:`fedsim.client.runtime.shared_runtime`).

    ``scenario`` is the checked Scenario (for the parts that legitimately read all of it:
    the server loop, checkpoints, the report); ``data`` its federation — or another one with
    the same client ids, such as a membership audit's shadow federation; ``device`` where
    models train. :meth:`new_model` is the model factory: every call returns a fresh copy of
    the same seeded initial model, on the CPU. ``on_device``: ``data``'s splits on ``device``,
    each copied there at most once in the run, whichever part (clients, evaluation, audit)
    reads it first.
    """

    scenario: Scenario
    data: FederatedData
    device: torch.device
    on_device: DeviceSplits = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "on_device", DeviceSplits(self.data, self.device))

    @classmethod
    def build(cls, scenario: Scenario, data: FederatedData | None = None) -> RunContext:
        """The context of ``scenario`` (its own data unless ``data`` is given)."""
        device = resolve_device(scenario.engine.device)
        return cls(scenario, build_federated_data(scenario) if data is None else data, device)

    def new_model(self) -> nn.Module:
        """A fresh seeded initial model (the global model of round 0), on the CPU."""
        return build_global_model(self.scenario, self.data)
