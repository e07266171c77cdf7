"""``client_membership``: did this client train? The loss attack at the client level, the
unit of client-level DP (McMahan et al., ICLR 2018).

A client's score is minus the final global model's mean loss on its local training data;
members are the clients whose update was aggregated in some round, non-members the others
(holdout clients and clients never sampled). It takes no options.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord

from fedsim.config import Scenario
from fedsim.privacy.audit_epsilon import AccountantClaim
from fedsim.privacy.audits.base import (
    UPLOADS,
    Audit,
    AuditContext,
    RoundView,
    register_audit,
)
from fedsim.privacy.audits.pool import Probe
from fedsim.privacy.metrics import attack_metrics


@register_audit("client_membership")
class ClientLevelMembership(Audit):
    """Members: the clients whose update was aggregated; scores from the final model."""

    summary = {"client_membership": ""}

    @classmethod
    def needs(cls, scenario: Scenario, options: None) -> frozenset[str]:
        return frozenset({UPLOADS})

    def __init__(self, ctx: AuditContext, options: None) -> None:
        super().__init__(ctx, options)
        self.probe = Probe(ctx.new_model().to(ctx.device), ctx.initial)
        self.trained: set[int] = set()  # clients whose update was aggregated in some round

    def observe(self, view: RoundView) -> None:
        self.trained.update(u.client for u in view.uploads)

    def state(self) -> dict:
        return {"trained": sorted(self.trained)}

    def restore(self, state: dict) -> None:
        self.trained = set(state["trained"])

    def finish(self, final: ArrayRecord, accountants: Sequence[AccountantClaim]) -> dict:
        data = self.ctx.data
        clients = sorted(set(data.participating) | set(data.holdout))
        scores = np.array([
            -float(self.probe.outputs(final, *self.ctx.on_device.client_train(c))[0].mean())
            for c in clients])
        member = np.array([c in self.trained for c in clients])
        out = {"unit": "client", "attack": "loss", "members": int(member.sum()),
               "nonmembers": int((~member).sum()),
               "members_from": "clients whose update was aggregated in some round",
               "nonmembers_from": "holdout clients and participating clients never aggregated"}
        if member.all() or not member.any():
            out.update(auc=None, why_null="every client trained, or none: raise "
                       "partition.holdout_clients for clients that never train")
        else:
            out.update(attack_metrics(scores, member))
        return {"client_membership": out}
