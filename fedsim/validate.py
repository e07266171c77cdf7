"""Edge checks: every name in a parsed scenario exists in its registry, and combinations work.

Parsing (:mod:`fedsim.config`) checks keys, types and ranges only; these checks need the
registries (and so torch and Flower) and run at the edge — ``fedsim.run``, the CLI, the
sweep, the Deployment Engine launcher — before anything trains. Importing this module
imports :mod:`fedsim.plugins`, so the registries are full when names are looked up.
"""

from __future__ import annotations

import inspect
import math

import torch

import fedsim.plugins  # noqa: F401  fedsim's strategies, compressors, crash hook register
from fedsim.client.dpsgd import BATCH_NORM_REFUSAL
from fedsim.config import Scenario
from fedsim.data.datasets import DATASETS
from fedsim.data.domains import DOMAINS
from fedsim.data.federated import FederatedData
from fedsim.data.partition import PARTITIONS
from fedsim.engine import ENGINES
from fedsim.errors import ScenarioError
from fedsim.models import ARCHS, NORMS
from fedsim.models.norm import uses_batch_statistics
from fedsim.server.factory import make_strategy
from fedsim.server.strategies import strategy_class


def check_names(scenario: Scenario) -> None:
    """Raise ScenarioError for an unknown dataset, partition, arch, norm, strategy or engine,
    ``[server.params]`` the strategy does not take, or ``[client.dp]`` where it cannot run."""
    DATASETS.get(scenario.data.name, key="data.name")
    PARTITIONS.get(scenario.partition.kind, key="partition.kind")
    if scenario.partition.kind == "feature":
        PARTITIONS.get(scenario.partition.label_kind, key="partition.label_kind")
        for name in scenario.partition.transforms:
            DOMAINS.get(name, key="partition.transforms")
    ARCHS.get(scenario.model.arch, key="model.arch")
    NORMS.get(scenario.model.norm, key="model.norm")
    ENGINES.get(scenario.engine.kind, key="engine.kind")
    make_strategy(scenario)
    check_strategy_params(scenario)
    check_client_dp(scenario)


def check_client_dp(scenario: Scenario) -> None:
    """Refuse ``[client.dp]`` (DP-SGD) with batch statistics or vectorized cohorts."""
    if not scenario.client.dp.enabled:
        return
    if uses_batch_statistics(scenario.model.norm):
        raise ScenarioError(BATCH_NORM_REFUSAL.format(norm=scenario.model.norm))
    if scenario.engine.vectorize:
        raise ScenarioError(
            "[client.dp] (DP-SGD) does not run in vectorized cohorts: engine.vectorize = true "
            "trains clients with one vmap over the cohort, and per-sample gradients would need "
            "a second vmap inside it, which fedsim's cohort trainer does not do; set "
            "engine.vectorize = false")


def check_strategy_params(scenario: Scenario) -> None:
    """Each ``[server.params]`` value must have the type of the constructor's default.

    Flower's strategies do not check their arguments: ``eta = "x"`` would only fail mid-run,
    inside ``aggregate_train``. Parameters without a default (or a ``None`` one) are not checked.
    """
    cls = strategy_class(scenario.server.strategy)
    params = inspect.signature(cls.__init__).parameters
    for key, value in scenario.server.params.items():
        default = params[key].default if key in params else None
        if default is None or default is inspect.Parameter.empty:
            continue
        is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, want = is_num and isinstance(value, int), "an integer"
        elif isinstance(default, float):
            ok, want = is_num and math.isfinite(value), "a finite number"
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "a string"
        else:
            continue
        if not ok:
            raise ScenarioError(
                f"server.params.{key} = {value!r} must be {want}, like its default in "
                f"{cls.__name__}({key}={default!r})"
            )


def check_forward(scenario: Scenario, model: torch.nn.Module, data: FederatedData) -> None:
    """Refuse a model whose forward pass fails on a batch of two of ``data``'s inputs (e.g.
    GroupNorm with one unit per group on the MLP's vectors), naming the ``[model]`` settings
    to change."""
    model.train()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        try:
            model(data.example_inputs(2))
        except (ValueError, RuntimeError) as exc:
            m = scenario.model
            raise ScenarioError(
                f"model.arch = {m.arch!r} with model.norm = {m.norm!r}, model.width = "
                f"{m.width} and model.groups = {m.groups} cannot run ({exc}); change "
                "model.width, model.groups or model.norm"
            ) from None


def check_batch_statistics(scenario: Scenario, model: torch.nn.Module,
                           data: FederatedData) -> None:
    """Refuse ``client.batch_size = 1`` when the model cannot train on a batch of one.

    BatchNorm after a linear layer sees one value per channel in a batch of one and cannot
    compute a variance; on conv features it averages over H·W and still trains (like IN).
    """
    if scenario.client.batch_size != 1:
        return
    model.train()
    with torch.random.fork_rng(devices=[]):
        try:
            model(data.example_inputs(1))
        except (ValueError, RuntimeError) as exc:
            raise ScenarioError(
                f"client.batch_size = 1 cannot train model.arch = {scenario.model.arch!r} with "
                f"model.norm = {scenario.model.norm!r} ({exc}); use client.batch_size >= 2 or a "
                "per-sample norm ('gn', 'ln', 'in', 'none')"
            ) from None
