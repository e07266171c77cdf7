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
from flwr.app import ConfigRecord, RecordDict

import fedsim.plugins  # noqa: F401  fedsim's strategies, compressors, crash hook register
from fedsim.client.dpsgd import BATCH_NORM_REFUSAL
from fedsim.client.hooks import CLIENT_HOOKS, HookContext, LocalArraysHook
from fedsim.config import Scenario
from fedsim.data.datasets import DATASETS
from fedsim.data.domains import DOMAINS
from fedsim.data.federated import FederatedData
from fedsim.data.partition import PARTITIONS
from fedsim.engine import ENGINES
from fedsim.errors import ScenarioError
from fedsim.models import ARCHS, NORMS
from fedsim.models.bn_statistics import bn_layers
from fedsim.models.norm import (
    model_uses_batch_statistics,
    norm_statistics_keys,
    uses_batch_statistics,
)
from fedsim.privacy.audits import check_names as check_audit_names
from fedsim.server.factory import make_strategy
from fedsim.server.strategies import strategy_class
from fedsim.sinks import sink_classes  # importing fedsim.sinks registers the built-in sinks


def check_names(scenario: Scenario) -> None:
    """Raise ScenarioError for an unknown dataset, partition, arch, norm, strategy, engine,
    sink, privacy audit or membership attack, ``[server.params]`` the strategy does not take,
    or ``[client.dp]`` where it cannot run."""
    DATASETS.get(scenario.data.name, key="data.name")
    PARTITIONS.get(scenario.partition.kind, key="partition.kind")
    if scenario.partition.kind == "feature":
        PARTITIONS.get(scenario.partition.label_kind, key="partition.label_kind")
        for name in scenario.partition.transforms:
            DOMAINS.get(name, key="partition.transforms")
    ARCHS.get(scenario.model.arch, key="model.arch")
    NORMS.get(scenario.model.norm, key="model.norm")
    ENGINES.get(scenario.engine.kind, key="engine.kind")
    sink_classes(scenario.output.sinks)  # names only: their packages are a preflight check
    make_strategy(scenario)
    check_strategy_params(scenario)
    check_client_dp(scenario)
    check_audit_names(scenario)


def check_client_dp(scenario: Scenario) -> None:
    """Refuse ``[client.dp]`` (DP-SGD) with batch statistics (a sample's output depends on its
    batch peers). Vectorized cohorts run it (per-sample gradients nested in the cohort);
    whether the model traces that way is checked with the engine
    (:func:`fedsim.engine.vectorized.check_vectorize`)."""
    if not scenario.client.dp.enabled:
        return
    if uses_batch_statistics(scenario.model.norm):
        raise ScenarioError(BATCH_NORM_REFUSAL.format(norm=scenario.model.norm))


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


def local_statistics_keys(scenario: Scenario, model: torch.nn.Module) -> list[str]:
    """The BN statistics keys the strategy's clients keep local (never upload): those of the
    ``client_hooks`` it asks for that keep arrays local (FedBN, SiloBN), read from the hooks
    themselves on ``model``."""
    stats = set(norm_statistics_keys(model))
    kept: list[str] = []
    for name in getattr(strategy_class(scenario.server.strategy), "client_hooks", ()) or ():
        cls = CLIENT_HOOKS.get(name, key="client-hooks")
        if issubclass(cls, LocalArraysHook):
            hook = cls(HookContext(0, ConfigRecord(), RecordDict()))
            kept += [k for k in hook.local_keys(model) if k in stats and k not in kept]
    return kept


def check_bn_statistics(scenario: Scenario, model: torch.nn.Module,
                        data: FederatedData) -> None:
    """Refuse ``server.bn_statistics`` and ``model.bn_eval`` where they cannot mean anything:

    - "pooled" / "recalibrate" need BN layers with running statistics the forward pass calls
      once each (``norm = "gn"`` has none: nothing to pool), and a strategy whose clients
      upload them (FedBN and SiloBN keep them local: nothing leaves the clients to pool);
    - ``bn_eval = "batch"`` needs a layer that normalises with batch statistics, and one that
      can do so from a single test sample (BN after a linear layer cannot: a client's local
      test split, or its last test batch, may hold one sample).
    """
    mode, bn_eval = scenario.server.bn_statistics, scenario.model.bn_eval
    m = scenario.model
    if mode != "average":
        try:
            layers = bn_layers(model, data.example_inputs(2))
        except ValueError as exc:
            raise ScenarioError(f"server.bn_statistics = {mode!r}: {exc}; use 'average'") from None
        if not layers:
            raise ScenarioError(
                f"server.bn_statistics = {mode!r} needs BatchNorm running statistics, and "
                f"model.arch = {m.arch!r} with model.norm = {m.norm!r} has none (nothing to "
                f"pool or recalibrate); use model.norm = 'bn' or 'hybrid', or "
                f"server.bn_statistics = 'average'")
        kept = local_statistics_keys(scenario, model)
        if kept:
            raise ScenarioError(
                f"server.bn_statistics = {mode!r} has nothing to pool with server.strategy = "
                f"{scenario.server.strategy!r}: its clients keep their BN running statistics "
                f"local and never upload them ({len(kept)} arrays, e.g. {kept[0]!r}); use "
                f"server.bn_statistics = 'average'")
    if bn_eval == "batch":
        if not model_uses_batch_statistics(model):
            raise ScenarioError(
                f"model.bn_eval = 'batch' changes nothing for model.norm = {m.norm!r}: no layer "
                "normalises with batch statistics; use model.bn_eval = 'running' or "
                "model.norm = 'bn' or 'hybrid'")
        model.train()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            try:
                model(data.example_inputs(1))
            except (ValueError, RuntimeError) as exc:
                raise ScenarioError(
                    f"model.bn_eval = 'batch' cannot evaluate model.arch = {m.arch!r} with "
                    f"model.norm = {m.norm!r}: a test batch of one sample (a small client's "
                    f"local test split) has no batch statistics there ({exc}); use "
                    "model.bn_eval = 'running' or a conv arch ('cnn', 'resnet')") from None
