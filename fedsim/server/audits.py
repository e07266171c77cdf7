"""The run's privacy audits, composed: the run's context, and what only the layers above
``fedsim.privacy`` can do, handed to the audits as callables (:mod:`fedsim.privacy.audits`).

- Shadow federations (:func:`shadow_trainer`): the scenario through the in-process engine
  and the usual round loop (strategy hooks, seeded sampling), without server-side
  evaluation, whatever ``engine.kind`` the run uses (engines give identical models).
- The attacked client's own training (:class:`AttackedClientTraining`): fedsim's client
  loop, as the inversion of a whole upload needs it.
- The strategy, for an audit that is part of it (canary clients, :mod:`fedsim.server.canaries`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.arrays import model_to_record
from fedsim.client.app import make_client_app
from fedsim.client.compress import as_uploaded
from fedsim.client.hooks import ClientHook
from fedsim.client.runtime import ClientRuntime
from fedsim.client.train import plan_batches, train_local
from fedsim.compat import task_identity_restored
from fedsim.config import Scenario
from fedsim.context import RunContext
from fedsim.data.federated import FederatedData
from fedsim.engine.inprocess import InProcessGrid
from fedsim.engine.ordered import ClientOrderedGrid
from fedsim.models.norm import uses_batch_statistics
from fedsim.privacy.audits import AuditContext, AuditSuite, check_run
from fedsim.privacy.audits.base import ShadowTrainer
from fedsim.rng import torch_generator
from fedsim.server.factory import make_strategy
from fedsim.server.loop import run_rounds


def train_federation(run: RunContext, on_replies: Callable) -> ArrayRecord:
    """Train ``run``'s federation (its scenario on its data, e.g. a shadow federation's) with
    the in-process engine and the usual round loop (strategy hooks, seeded sampling),
    without server-side evaluation.

    ``on_replies(round, replies, arrays)`` sees every round, and round 0 (no replies) first.
    Flower's process-wide task identity is restored afterwards.
    """
    logging.getLogger("flwr").setLevel(logging.WARNING)  # as the ServerApp does
    with task_identity_restored():
        nodes = len(run.data.participating)
        client_app = make_client_app(ClientRuntime.for_run(run))
        grid = ClientOrderedGrid(InProcessGrid(client_app, nodes), nodes)
        model = run.new_model()
        arrays = model_to_record(model)
        on_replies(0, [], arrays)
        return run_rounds(make_strategy(run.scenario, model), grid, arrays, run.scenario,
                          lambda _arrays: {}, lambda _record: None, on_replies=on_replies)


def shadow_trainer(device: torch.device) -> ShadowTrainer:
    """``train_shadow(scenario, data, on_round)`` for the audits: a shadow federation on
    ``device`` (:func:`train_federation`)."""

    def train(scenario: Scenario, data: FederatedData,
              on_round: Callable[[int, ArrayRecord], None]) -> None:
        train_federation(RunContext(scenario, data, device),
                         lambda rnd, _replies, arrays: on_round(rnd, arrays))

    return train


class _EvalBN(ClientHook):
    """Keeps the attacked client's model in eval mode (``bn_mode = "eval"``: BN uses its
    running statistics and leaves them unchanged)."""

    def __init__(self) -> None:
        pass

    def before_train(self, model: nn.Module) -> None:
        model.eval()


class AttackedClientTraining:
    """The attacked client's local training as fedsim's clients run it (plain local SGD,
    no strategy hooks), its batch plan and its upload compressor
    (:class:`fedsim.privacy.audits.base.AttackedClient`)."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.drop_singleton = uses_batch_statistics(scenario.model.norm)

    def _generator(self, rnd: int, cid: int) -> torch.Generator:
        return torch_generator(self.scenario.seed, "client-train", rnd, cid)

    def plan(self, n: int, rnd: int, cid: int) -> list[torch.Tensor]:
        return plan_batches(n, self.scenario.client, self._generator(rnd, cid),
                            drop_singleton=self.drop_singleton)

    def train(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, rnd: int, cid: int,
              bn_mode: str) -> nn.Module:
        train_local(model, x, y, self.scenario.client, self._generator(rnd, cid),
                    [_EvalBN()] if bn_mode == "eval" else [],
                    drop_singleton=self.drop_singleton)
        return model

    def uploaded(self, deltas: list[torch.Tensor], rnd: int, cid: int) -> list[torch.Tensor]:
        return as_uploaded(deltas, self.scenario.client, self.scenario.seed, rnd, cid)


def audit_context(run: RunContext, out: Path | None = None,
                  initial: ArrayRecord | None = None, strategy: object = None) -> AuditContext:
    """The audits' view of ``run``, with the shadow trainer and the attacked client's
    training composed here."""
    return AuditContext(run.scenario, run.data, run.device, run.on_device, run.new_model,
                        train_shadow=shadow_trainer(run.device),
                        attacked_client=AttackedClientTraining(run.scenario),
                        out=out, initial=initial, strategy=strategy)


def check_audits(run: RunContext) -> None:
    """Bad ``[privacy]`` input raises ScenarioError before anything trains."""
    if run.scenario.privacy.enabled:
        check_run(audit_context(run))


def make_audits(run: RunContext, out: Path, initial: ArrayRecord,
                strategy: object) -> AuditSuite | None:
    """The run's audits (None when ``privacy.audits`` is empty)."""
    if not run.scenario.privacy.enabled:
        return None
    return AuditSuite(audit_context(run, Path(out), initial, strategy))
