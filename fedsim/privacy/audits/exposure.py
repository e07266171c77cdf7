"""``exposure``: canary exposure of secrets planted in clients' text (``[privacy.exposure]``;
Carlini et al., "The Secret Sharer", USENIX Security 2019; :mod:`fedsim.privacy.exposure`).

The data plants the canaries (:mod:`fedsim.data.canaries`) when this audit is listed. The
server is the attacker, as in every fedsim audit: it ranks the candidate secrets with the
global model it holds after the audited rounds (every ``every`` rounds and the last), and
with each canary client's own model as the server sees it in round ``round`` (the global
model it was sent, with its upload on top; Nasr et al. 2019's per-client view). A canary
client not sampled that round has no upload row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from flwr.app import ArrayRecord
from torch import nn

from fedsim.config import ExposureConfig, Scenario
from fedsim.data.federated import FederatedData
from fedsim.data.shakespeare import SPEECH_SEPARATOR, TextFederation, encode
from fedsim.errors import ScenarioError
from fedsim.privacy.audit_epsilon import AccountantClaim
from fedsim.privacy.audits.base import UPLOADS, Audit, AuditContext, RoundView, register_audit
from fedsim.privacy.audits.client_mia import audited_round
from fedsim.privacy.audits.pool import Probe
from fedsim.privacy.exposure import (
    all_log_perplexities,
    exposure,
    fitted_exposure,
    log_perplexities,
    rank_of,
    sampled_exposure,
)
from fedsim.rng import numpy_rng


def check_exposure(data: FederatedData) -> None:
    """Refuse the audit on data without planted canaries (not text)."""
    if not (isinstance(data, TextFederation) and data.canaries):
        raise ScenarioError(
            "privacy.audits names 'exposure', which plants secrets into clients' text and "
            "ranks them with the model; it needs data.name = 'shakespeare' (drop 'exposure' "
            "from privacy.audits otherwise)")


class CanaryRanker:
    """Ranks the planted canaries among the candidate secrets on one model (see the module).

    ``measure(model, clients)`` ranks the canaries of ``clients`` (all when None): with
    ``candidates = 0`` one walk of the digit tree scores every candidate for all canaries at
    once; else the same seeded sample of candidates is scored on every model, plus each
    canary itself.
    """

    def __init__(self, cfg: ExposureConfig, data: TextFederation, seed: int) -> None:
        self.cfg = cfg
        self.canaries = data.canaries
        self.seq_len = data.seq_len
        self.context = encode(SPEECH_SEPARATOR + cfg.prefix).astype(np.int64)
        self.digit_ids = encode("0123456789").astype(np.int64)
        self.pad = int(encode(" ")[0])
        self.space = 10 ** cfg.digits
        self.sample = (numpy_rng(seed, "privacy", "exposure-candidates").integers(
            0, 10, size=(cfg.candidates, cfg.digits)) if cfg.candidates else None)

    @property
    def method(self) -> str:
        return "exact" if self.sample is None else f"sampled ({len(self.sample)} candidates)"

    def clients(self) -> set[int]:
        """The clients that hold canaries."""
        return {c.client for c in self.canaries}

    def measure(self, model: nn.Module, clients: Iterable[int] | None = None) -> list[dict]:
        """One row per canary (of ``clients``): its exposure, rank and log-perplexity."""
        wanted = None if clients is None else set(clients)
        canaries = [c for c in self.canaries if wanted is None or c.client in wanted]
        if not canaries:
            return []
        args = (self.context, self.digit_ids)
        rows = []
        if self.sample is None:
            px = all_log_perplexities(model, *args, self.cfg.digits, self.seq_len, self.pad)
            for c in canaries:
                own = float(px[int(c.secret)])
                rows.append({"canary": c.index, "client": c.client, "secret": c.secret,
                             "log_perplexity": own, "rank": rank_of(own, px),
                             "exposure": exposure(own, px)})
            return rows
        px = log_perplexities(model, *args, self.sample, self.seq_len, self.pad)
        secrets = np.array([[int(d) for d in c.secret] for c in canaries])
        own = log_perplexities(model, *args, secrets, self.seq_len, self.pad)
        for c, value in zip(canaries, own):
            est = sampled_exposure(float(value), px, self.space)
            rows.append({"canary": c.index, "client": c.client, "secret": c.secret,
                         "log_perplexity": float(value),
                         "rank": self.space * 2.0 ** -est,  # 1 + q (|R| - 1), estimated
                         "exposure": est,
                         "exposure_fit": fitted_exposure(float(value), px, self.space)})
        return rows


@register_audit("exposure")
class Exposure(Audit):
    """Every canary's exposure on the global model at the audited rounds and on the canary
    clients' uploads of round ``round``."""

    summary = {"exposure": "(text data: data.name = 'shakespeare')"}

    @classmethod
    def needs(cls, scenario: Scenario, options: ExposureConfig) -> frozenset[str]:
        return frozenset({UPLOADS})

    @classmethod
    def check(cls, ctx: AuditContext, options: ExposureConfig) -> None:
        check_exposure(ctx.data)
        audited_round("exposure.round", options.round, ctx.scenario)

    def __init__(self, ctx: AuditContext, options: ExposureConfig) -> None:
        super().__init__(ctx, options)
        total, every = ctx.scenario.server.rounds, options.every
        self.rounds = (set(range(every, total + 1, every)) if every else set()) | {total}
        self.round = audited_round("exposure.round", options.round, ctx.scenario)
        assert isinstance(ctx.data, TextFederation)  # check_exposure
        self.ranker = CanaryRanker(options, ctx.data, ctx.scenario.seed)
        self.probe = Probe(ctx.new_model().to(ctx.device), ctx.initial)
        self.global_rows: dict[int, list[dict]] = {}  # round -> one row per canary
        self.upload_rows: list[dict] = []

    def observe(self, view: RoundView) -> None:
        if view.round in self.rounds:
            self.global_rows[view.round] = self.ranker.measure(self.probe.load(view.arrays))
        if view.round != self.round:
            return
        holders = self.ranker.clients()
        for upload in view.uploads:
            if upload.client in holders:  # the client's model as the server sees it
                model = self.probe.load(view.sent, upload.arrays)
                self.upload_rows += [{"round": view.round, **row}
                                     for row in self.ranker.measure(model, [upload.client])]

    def state(self) -> dict:
        return {"global": self.global_rows, "uploads": self.upload_rows}

    def restore(self, state: dict) -> None:
        self.global_rows = {int(k): list(v) for k, v in state["global"].items()}
        self.upload_rows = list(state["uploads"])

    def finish(self, final: ArrayRecord, accountants: Sequence[AccountantClaim]) -> dict:
        last = max(self.global_rows) if self.global_rows else None
        out = {
            "canaries": len(self.ranker.canaries),
            "repeats": self.opts.repeats,
            "clients": sorted(self.ranker.clients()),
            "prefix": self.opts.prefix,
            "digits": self.opts.digits,
            "space": self.ranker.space,
            "max_exposure": math.log2(self.ranker.space),
            "method": self.ranker.method,
            "global": _block(last, self.global_rows.get(last, [])),
            "global_by_round": [{"round": r, **_stats(rows)}
                                for r, rows in sorted(self.global_rows.items())],
            "upload": _block(self.round, self.upload_rows),
        }
        if not self.upload_rows:
            out["upload"]["why_none"] = (f"no canary client was sampled in round {self.round} "
                                         "(privacy.exposure.round)")
        return {"exposure": out}


def _stats(rows: list[dict]) -> dict:
    values = [r["exposure"] for r in rows]
    return {"mean": float(np.mean(values)) if values else None,
            "max": float(np.max(values)) if values else None}


def _block(rnd: int | None, rows: list[dict]) -> dict:
    return {"round": rnd, **_stats(rows), "per_canary": rows}
