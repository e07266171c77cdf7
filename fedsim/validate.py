"""Checks that need the registries: every name in a scenario exists, and combinations work."""

from __future__ import annotations

import torch

from fedsim.config import Scenario
from fedsim.errors import ScenarioError


def check_names(scenario: Scenario) -> None:
    """Raise ScenarioError for an unknown dataset, partition, arch, norm, strategy or engine."""
    from fedsim.data.datasets import DATASETS
    from fedsim.data.domains import DOMAINS
    from fedsim.data.partition import PARTITIONS
    from fedsim.engine import ENGINES
    from fedsim.models import ARCHS, NORMS
    from fedsim.server.strategies import make_strategy

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


def check_batch_statistics(scenario: Scenario, model: torch.nn.Module,
                           input_shape: tuple[int, int, int]) -> None:
    """Refuse ``client.batch_size = 1`` when the model cannot train on a batch of one.

    BatchNorm after a linear layer sees one value per channel in a batch of one and cannot
    compute a variance; on conv features it averages over H·W and still trains (like IN).
    """
    if scenario.client.batch_size != 1:
        return
    model.train()
    with torch.random.fork_rng(devices=[]):
        try:
            model(torch.zeros(1, *input_shape))
        except (ValueError, RuntimeError) as exc:
            raise ScenarioError(
                f"client.batch_size = 1 cannot train model.arch = {scenario.model.arch!r} with "
                f"model.norm = {scenario.model.norm!r} ({exc}); use client.batch_size >= 2 or a "
                "per-sample norm ('gn', 'ln', 'in', 'none')"
            ) from None
