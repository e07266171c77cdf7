"""What an audit is, what the run hands it, and the registry of audits.

An audit watches what the server sees during training and reports at the end (the server is
the attacker; Nasr et al., IEEE S&P 2019). Each is one class in one module, registered under
the name ``privacy.audits`` lists and configured by its own section ``[privacy.<name>]``
(an audit registered outside fedsim: ``[privacy.plugins.<name>]``, parsed by its
``options`` dataclass). It declares what it needs from the run (:data:`NEEDS`), and the run
checks those needs instead of knowing audits by name. Its ``state()`` goes into every
checkpoint, so a resumed run reports what an uninterrupted one does.

Audits never drive training (breaching's pipeline: payload → user update → attacker →
analysis). What only the layers above can do arrives as callables in :class:`AuditContext`:
training a shadow federation (``train_shadow``), the attacked client's own local training
(``attacked_client``), the strategy a server-side mechanism lives in (``strategy``). So this
package imports nothing above ``models`` / ``data`` (``tests/test_layers.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.config import Scenario, build_section
from fedsim.data.federated import FederatedData
from fedsim.device import DeviceSplits
from fedsim.errors import ScenarioError
from fedsim.privacy.audit_epsilon import AccountantClaim
from fedsim.registry import Registry

#: what an audit (or a membership attack) may need from the run:
#: shadow (reference) federations trained on the audit pool (``AuditContext.train_shadow``)
SHADOWS = "shadows"
#: examples no model trained on, for population-based scores (``privacy.mia.population``)
POPULATION = "population"
#: each client's upload in the rounds observed (``RoundView.uploads``)
UPLOADS = "uploads"
#: the attacked client's own local training (``AuditContext.attacked_client``)
LOCAL_TRAINING = "local_training"
#: DP-SGD on the clients (``[client.dp]``)
CLIENT_DP = "client_dp"
#: the run's strategy, for an audit that is part of it (``AuditContext.strategy``)
STRATEGY = "strategy"
NEEDS = (SHADOWS, POPULATION, UPLOADS, LOCAL_TRAINING, CLIENT_DP, STRATEGY)


@dataclass(frozen=True)
class Upload:
    """What one client sent back in a round: its id and the arrays it uploaded."""

    client: int
    arrays: ArrayRecord


@dataclass(frozen=True)
class RoundView:
    """What the server sees of round ``round``: the global arrays it sent at its start
    (``sent``), the accepted uploads, and the global arrays after aggregation (``arrays``).
    Round 0 has no uploads, and ``sent`` = ``arrays`` = the initial model."""

    round: int
    sent: ArrayRecord
    arrays: ArrayRecord
    uploads: tuple[Upload, ...] = ()


#: ``train_shadow(scenario, data, on_round)``: train the federation ``scenario`` describes on
#: ``data`` (a shadow's: same client ids, other training rows) through the in-process engine
#: and the usual round loop, calling ``on_round(round, global arrays)`` for round 0 and every
#: round after aggregation
ShadowTrainer = Callable[[Scenario, FederatedData, Callable[[int, ArrayRecord], None]], None]


class AttackedClient(Protocol):
    """The attacked client's own training, as the client layer runs it (the inversion of a
    whole upload compares the attacker's simulation with it)."""

    def plan(self, n: int, rnd: int, cid: int) -> list[torch.Tensor]:
        """The batches (indices into its ``n`` images) client ``cid`` trains on in round
        ``rnd``, in order."""

    def train(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, rnd: int, cid: int,
              bn_mode: str) -> nn.Module:
        """``model`` trained in place as client ``cid`` trains in round ``rnd`` (plain local
        SGD, no strategy hooks; BN in ``bn_mode``); returns it."""

    def uploaded(self, deltas: list[torch.Tensor], rnd: int, cid: int) -> list[torch.Tensor]:
        """What the client uploads for the parameter updates ``deltas`` (its compressor)."""


@dataclass(frozen=True)
class AuditContext:
    """What a run gives its audits, built by the run layer (:mod:`fedsim.server.audits`).

    ``scenario``, ``data`` and ``device`` are the run's; ``on_device`` its device copies of
    the data (shared with evaluation); ``new_model()`` a fresh seeded initial model on the
    CPU. ``out``: the results folder (figures); ``initial``: the initial global arrays;
    ``strategy``: the outermost strategy — these three are None while the scenario is only
    checked, before anything is built.
    """

    scenario: Scenario
    data: FederatedData
    device: torch.device
    on_device: DeviceSplits
    new_model: Callable[[], nn.Module]
    train_shadow: ShadowTrainer | None = None
    attacked_client: AttackedClient | None = None
    out: Path | None = None
    initial: ArrayRecord | None = None
    strategy: object | None = None


class Audit:
    """One audit. Subclasses set the class attributes, override the hooks they use, and
    register with ``@AUDITS.register(name)``.

    - ``options``: the dataclass of its section. fedsim's own sections are fields of
      :class:`fedsim.config.PrivacyConfig`; an audit registered elsewhere gives its own
      dataclass, parsed from ``[privacy.plugins.<name>]``. None: it takes no options.
    - ``summary``: the keys it writes under ``summary.json``'s ``privacy``, each with what
      else it takes to appear (reports say how to turn a missing metric on).
    - :meth:`needs`: what it needs from the run (:data:`NEEDS`).
    """

    name: ClassVar[str] = ""
    options: ClassVar[type | None] = None
    summary: ClassVar[Mapping[str, str]] = {}

    def __init__(self, ctx: AuditContext, options: Any) -> None:
        self.ctx = ctx
        self.opts = options

    @classmethod
    def needs(cls, scenario: Scenario, options: Any) -> frozenset[str]:
        return frozenset()

    @classmethod
    def check_names(cls, scenario: Scenario, options: Any) -> None:
        """Bad settings only the registries can judge (ScenarioError), before any data."""

    @classmethod
    def check(cls, ctx: AuditContext, options: Any) -> None:
        """Bad settings for this run's data (ScenarioError), before anything trains."""

    def observe(self, view: RoundView) -> None:
        """Called for round 0 (the initial model) and after every round's aggregation."""

    def state(self) -> dict:
        """What it captured so far, for the checkpoint (plain values, tensors, arrays)."""
        return {}

    def restore(self, state: dict) -> None:
        """Put :meth:`state` back after ``--resume``."""

    def finish(self, final: ArrayRecord, accountants: Sequence[AccountantClaim]) -> dict:
        """Its part of ``summary.json``'s ``privacy``: keys among ``summary``. ``final``: the
        final global arrays; ``accountants``: the DP guarantees the run claims."""
        return {}


AUDITS: Registry[type[Audit]] = Registry("privacy audit")


def register_audit(name: str) -> Callable[[type[Audit]], type[Audit]]:
    """``@register_audit("name")``: add an :class:`Audit` subclass under ``name``."""

    def add(cls: type[Audit]) -> type[Audit]:
        cls.name = name
        return AUDITS.register(name)(cls)

    return add


def with_options(registry: Registry, names: Sequence[str], section: Any, prefix: str,
                 list_key: str) -> list[tuple[Any, Any]]:
    """The entries of ``registry`` named by ``<prefix>.<list_key>`` (``names``), in order, each
    with its options: ``section``'s own table named after it (fedsim's, a dataclass field of
    ``section``) or its ``<prefix>.plugins.<name>`` table parsed by the entry's ``options``
    dataclass (None: it takes none). ScenarioError for an unknown name, or a plugins table no
    named entry claims."""
    for name in section.plugins:
        if name not in names:
            registry.get(name, key=f"{prefix}.plugins.{name}")  # a typo: did-you-mean
            raise ScenarioError(f"{prefix}.plugins.{name} configures the {name!r} "
                                f"{registry.kind}, which {prefix}.{list_key} = {list(names)} "
                                "does not name; add it or drop the table")
    out = []
    for name in names:
        cls = registry.get(name, key=f"{prefix}.{list_key}")
        table = section.plugins.get(name)
        key = f"{prefix}.plugins.{name}"
        own = getattr(section, name, None)
        if dataclasses.is_dataclass(own):
            if table is not None:
                raise ScenarioError(f"{key}: the {name!r} {registry.kind} is configured in "
                                    f"[{prefix}.{name}]; move the table there")
            options = own
        elif cls.options is None:
            if table:
                raise ScenarioError(f"{key}: the {name!r} {registry.kind} takes no options; "
                                    "drop the table")
            options = None
        else:
            options = build_section(cls.options, table or {}, key)
        out.append((cls, options))
    return out


def listed_audits(scenario: Scenario) -> list[tuple[type[Audit], Any]]:
    """The audits ``privacy.audits`` names, in order, with their options."""
    return with_options(AUDITS, scenario.privacy.audits, scenario.privacy, "privacy", "audits")


def summary_owner(key: str) -> type[Audit] | None:
    """The registered audit that writes ``summary.json`` ``privacy.<key>``, or None."""
    for name in AUDITS:
        cls = AUDITS.get(name)
        if key in cls.summary:
            return cls
    return None
