"""The audits of one run: built from ``privacy.audits``, fed every round the server sees,
checkpointed together, reported together under ``summary.json``'s ``privacy``.

:func:`check_names` runs at the edge (registry names, settings that need no data) and
:func:`check_run` before anything trains (settings against the run's data, and the needs the
run must meet: shadow training, the attacked client's training, DP-SGD). Neither knows an
audit by name: each audit declares its needs and checks its own settings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message

from fedsim.config import Scenario
from fedsim.errors import ScenarioError
from fedsim.privacy.audit_epsilon import AccountantClaim
from fedsim.privacy.audits.base import (
    CLIENT_DP,
    LOCAL_TRAINING,
    SHADOWS,
    STRATEGY,
    UPLOADS,
    AuditContext,
    RoundView,
    Upload,
    listed_audits,
)
from fedsim.records import require_record

#: what the run must hand in for each need (AuditContext field), and what it is
_HANDED_IN = {SHADOWS: ("train_shadow", "shadow federations"),
              LOCAL_TRAINING: ("attacked_client", "the attacked client's own training")}


def check_names(scenario: Scenario) -> None:
    """Unknown audits or attacks, plugin tables no audit claims, settings only the
    registries can judge, and needs the scenario cannot meet (ScenarioError)."""
    for cls, options in listed_audits(scenario):
        if CLIENT_DP in cls.needs(scenario, options) and not scenario.client.dp.enabled:
            raise ScenarioError(
                f"privacy.audits names {cls.name!r}, which needs DP-SGD on the clients, and "
                "this run has none; set [client.dp] (noise_multiplier or target_epsilon; a "
                "tiny noise_multiplier for a run that is private in name only)")
        cls.check_names(scenario, options)


def check_run(ctx: AuditContext) -> None:
    """:func:`check_names`, then each audit's settings against the run's data and the parts
    the run hands in (ScenarioError), before anything trains."""
    check_names(ctx.scenario)
    for cls, options in listed_audits(ctx.scenario):
        for need, (field, what) in _HANDED_IN.items():
            if need in cls.needs(ctx.scenario, options) and getattr(ctx, field) is None:
                raise ScenarioError(f"privacy.audits names {cls.name!r}, which needs {what}; "
                                    "this run cannot provide them")
        cls.check(ctx, options)


class AuditSuite:
    """The listed audits of a run (:class:`~fedsim.privacy.audits.base.Audit`), in order.

    ``on_replies`` goes to :func:`fedsim.server.loop.run_rounds` (and is called for round 0
    with no replies before the first round); ``checkpoint_state`` / ``restore_state`` to the
    checkpoints; ``finish`` returns the ``privacy`` section of summary.json and writes the
    audits' figures into the results folder.
    """

    def __init__(self, ctx: AuditContext) -> None:
        check_run(ctx)
        self.ctx = ctx
        listed = listed_audits(ctx.scenario)
        self.audits = [cls(ctx, options) for cls, options in listed]
        needs = [cls.needs(ctx.scenario, options) for cls, options in listed]
        if ctx.strategy is None and any(STRATEGY in n for n in needs):
            raise ScenarioError("privacy.audits names an audit that is part of the strategy, "
                                "and this run hands in none")
        self.uploads = any(UPLOADS in n for n in needs)
        self._sent = ctx.initial  # the global arrays the server sent at the round's start

    def on_replies(self, rnd: int, replies: Sequence[Message], arrays: ArrayRecord) -> None:
        """What the server sees of round ``rnd``: its accepted replies and the new arrays."""
        uploads = tuple(
            Upload(int(require_record(m.content, "client", ConfigRecord)["client-id"]),
                   require_record(m.content, "arrays", ArrayRecord))
            for m in replies if not m.has_error()) if self.uploads else ()
        view = RoundView(rnd, self._sent if rnd else arrays, arrays, uploads)
        for audit in self.audits:
            audit.observe(view)
        self._sent = arrays

    def checkpoint_state(self) -> dict:
        """Every audit's captures so far and the last global arrays sent: checkpointed with
        the run, so a resumed run reports the same privacy results as an uninterrupted one."""
        return {"sent": self._sent, "audits": {a.name: a.state() for a in self.audits}}

    def restore_state(self, state: dict) -> None:
        """Put :meth:`checkpoint_state` back (after ``--resume``)."""
        missing = [a.name for a in self.audits if a.name not in state["audits"]]
        if missing:
            raise ScenarioError(f"the checkpoint holds no captures of audit(s) {missing}; "
                                "start the run again")
        self._sent = state["sent"]
        for audit in self.audits:
            audit.restore(state["audits"][audit.name])

    def finish(self, arrays: ArrayRecord, accountants: Sequence[AccountantClaim] = ()) -> dict:
        """Run the audits after training; their results, merged, with the time they took.
        ``accountants``: the DP guarantees the run claims
        (:func:`fedsim.privacy.audit_epsilon.accountant_claims`)."""
        t0 = time.perf_counter()
        result: dict = {}
        for audit in self.audits:
            part = audit.finish(arrays, accountants)
            stray = sorted(set(part) - set(audit.summary))
            if stray:
                raise RuntimeError(f"audit {audit.name!r} reported {stray}, which its `summary` "
                                   "does not declare")
            result.update(part)
        result["seconds"] = time.perf_counter() - t0
        return result
