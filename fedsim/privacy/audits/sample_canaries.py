"""``canary_samples``: the sample-level one-run audit of DP-SGD with gradient canaries
(``[privacy.canary_samples]``; Steinke, Nasr & Jagielski, "Privacy Auditing with One (1)
Training Run", NeurIPS 2023, white-box).

Each canary is held by a participating client (:mod:`fedsim.canaries`) and is in with
probability 1/2; the clients' DP-SGD adds an in canary's direction to its clipped sums. In
every round the server sees each sampled client's upload; a canary's score is the largest,
over the rounds its client took part in, cosine between the client's update (what it was
sent minus what it uploaded: DP-SGD steps *against* the canary's gradient) and the canary's
direction, over the uploaded trainable parameters. Canaries of clients never seen score below
any cosine. The scores and bits give the one-run lower bound
(:func:`fedsim.privacy.one_run.one_run_audit`) of the sample-level ε.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord

from fedsim.canaries import SAMPLE, included, owners, parameter_size, unit_directions
from fedsim.config import CanarySamplesConfig, Scenario
from fedsim.privacy.audit_epsilon import AccountantClaim
from fedsim.privacy.audits.base import (
    CLIENT_DP,
    UPLOADS,
    Audit,
    AuditContext,
    RoundView,
    register_audit,
)
from fedsim.privacy.one_run import one_run_audit


@register_audit("canary_samples")
class SampleCanaries(Audit):
    """Scores each gradient canary by its client's uploads; a lower bound at the end."""

    summary = {"sample_canary_audit": "with [client.dp]"}

    @classmethod
    def needs(cls, scenario: Scenario, options: CanarySamplesConfig) -> frozenset[str]:
        return frozenset({CLIENT_DP, UPLOADS})

    def __init__(self, ctx: AuditContext, options: CanarySamplesConfig) -> None:
        super().__init__(ctx, options)
        seed, count = ctx.scenario.seed, options.count
        model = ctx.new_model()
        self.count, self.seed = count, seed
        self.owners = owners(count, ctx.data.participating, seed)
        self.included = included(count, seed, SAMPLE)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.sizes = [p.numel() for _, p in model.named_parameters() if p.requires_grad]
        self.dim = parameter_size(model)
        self.best = np.full(count, -np.inf)

    def observe(self, view: RoundView) -> None:
        for upload in view.uploads:
            self._score(upload.client, upload.arrays, view.sent)

    def _score(self, cid: int, upload: ArrayRecord, sent: ArrayRecord) -> None:
        mine = np.flatnonzero(self.owners == cid)
        if not mine.size:
            return
        keep = np.concatenate([np.full(n, name in upload, dtype=bool)
                               for name, n in zip(self.names, self.sizes, strict=True)])
        step = np.concatenate([(sent[k].numpy().astype(np.float64)
                                - upload[k].numpy().astype(np.float64)).ravel()
                               for k in self.names if k in upload])
        directions = unit_directions(self.dim, self.seed, SAMPLE, mine)[:, keep]
        size = np.linalg.norm(step) * np.linalg.norm(directions, axis=1)
        cos = np.where(size > 0, directions @ step / np.where(size > 0, size, 1.0), 0.0)
        self.best[mine] = np.maximum(self.best[mine], cos)

    def state(self) -> dict:
        return {"best": self.best}

    def restore(self, state: dict) -> None:
        self.best = np.asarray(state["best"])

    def finish(self, final: ArrayRecord, accountants: Sequence[AccountantClaim]) -> dict:
        claim = next((c for c in accountants if c.unit == "sample"), None)
        confidence = self.ctx.scenario.privacy.audit_confidence
        seen = np.isfinite(self.best)
        scores = np.where(seen, self.best, -2.0)  # below every cosine
        out = {"unit": "sample", "canaries": self.count, "inserted": int(self.included.sum()),
               "observed": int(seen.sum()),
               "statistic": "max over the rounds its client took part in of cos(sent − "
                            "upload, u_i)",
               "accountant": None if claim is None else {
                   "epsilon": claim.epsilon, "delta": claim.delta, "from": claim.source},
               "lower_bound": None}
        if self.included.all() or not self.included.any():
            out["why_null"] = "every canary is in, or none: raise privacy.canary_samples.count"
        else:
            out["lower_bound"] = one_run_audit(scores, self.included,
                                               self.ctx.scenario.client.dp.delta, confidence)
        return {"sample_canary_audit": out}
