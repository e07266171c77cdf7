"""``client_mia``: the loss attack on each client's own upload (``[privacy.client_mia]``).

In FL the server also sees each client's update (Nasr et al., IEEE S&P 2019): in round
``round`` it holds each sampled client's uploaded model, and the loss attack (Yeom et al.
2018) on that client's own members vs non-members (:class:`~fedsim.privacy.audits.pool.
MembershipPool`) gives one AUC per client, reported as a distribution next to the same
attack on the aggregated model.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import ArrayRecord

from fedsim.config import ClientMiaConfig, Scenario
from fedsim.errors import ScenarioError
from fedsim.privacy.attacks.loss import loss_attack
from fedsim.privacy.audit_epsilon import AccountantClaim
from fedsim.privacy.audits.base import (
    UPLOADS,
    Audit,
    AuditContext,
    RoundView,
    register_audit,
)
from fedsim.privacy.audits.pool import MembershipPool, Probe
from fedsim.privacy.metrics import attack_metrics
from fedsim.stats import distribution


def audited_round(key: str, value: int, scenario: Scenario) -> int:
    """The round ``privacy.<key> = value`` names (0: the last), refused beyond the run."""
    rounds = scenario.server.rounds
    if value > rounds:
        raise ScenarioError(f"privacy.{key} = {value} is out of range; the run has "
                            f"server.rounds = {rounds}")
    return value or rounds


@register_audit("client_mia")
class ClientMembership(Audit):
    """Per-upload membership inference: one AUC per client of round ``round``."""

    summary = {"client_mia": ""}

    @classmethod
    def needs(cls, scenario: Scenario, options: ClientMiaConfig) -> frozenset[str]:
        return frozenset({UPLOADS})

    @classmethod
    def check(cls, ctx: AuditContext, options: ClientMiaConfig) -> None:
        audited_round("client_mia.round", options.round, ctx.scenario)

    def __init__(self, ctx: AuditContext, options: ClientMiaConfig) -> None:
        super().__init__(ctx, options)
        self.round = audited_round("client_mia.round", options.round, ctx.scenario)
        self.pool = MembershipPool.build(ctx.data, ctx.scenario.seed)
        self.probe = Probe(ctx.new_model().to(ctx.device), ctx.initial)
        self.rows: list[dict] = []

    def observe(self, view: RoundView) -> None:
        if view.round != self.round:
            return
        for upload in view.uploads:
            x, y, is_member = self.pool.client_tensors(self.ctx.on_device, upload.client)
            # the client's model as the server sees it: what it sent, with the upload on top
            own = attack_metrics(
                loss_attack(self.probe.outputs(upload.arrays, x, y, view.sent)[0]), is_member)
            glob = attack_metrics(loss_attack(self.probe.outputs(view.arrays, x, y)[0]),
                                  is_member)
            self.rows.append({"client": upload.client, "members": int(is_member.sum()),
                              "auc": own["auc"], "global_auc": glob["auc"]})

    def state(self) -> dict:
        return {"rows": self.rows}

    def restore(self, state: dict) -> None:
        self.rows = list(state["rows"])

    def finish(self, final: ArrayRecord, accountants: Sequence[AccountantClaim]) -> dict:
        return {"client_mia": {
            "round": self.round,
            "attack": "loss",
            "auc": distribution([r["auc"] for r in self.rows]),
            "global_model_auc": distribution([r["global_auc"] for r in self.rows]),
            "per_client": self.rows,
        }}
