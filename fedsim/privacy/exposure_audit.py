"""The ``[privacy.exposure]`` audit: canary exposure (:mod:`fedsim.privacy.exposure`) of the
global model at the audited rounds and of the canary clients' uploads.

The server is the attacker, as in every fedsim audit: it ranks the candidate secrets with
the global model it holds after the audited rounds (``privacy.audit_every`` and the last),
and with each canary client's own model as the server sees it in round
``privacy.client_round`` (the global model it was sent, with its upload on top; Nasr et
al. 2019's per-client view). A canary client not sampled that round has no upload row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from torch import nn

from fedsim.config import ExposureConfig
from fedsim.data.shakespeare import SPEECH_SEPARATOR, TextFederation, encode
from fedsim.errors import ScenarioError
from fedsim.privacy.exposure import (
    all_log_perplexities,
    exposure,
    fitted_exposure,
    log_perplexities,
    rank_of,
    sampled_exposure,
)
from fedsim.rng import numpy_rng


def check_exposure(cfg: ExposureConfig, data: object) -> None:
    """Refuse ``[privacy.exposure]`` on data without planted canaries (not text)."""
    if cfg.enabled and not (isinstance(data, TextFederation) and data.canaries):
        raise ScenarioError(
            "privacy.exposure plants secrets into clients' text and ranks them with the "
            "model; it needs data.name = 'shakespeare' (set privacy.exposure.canaries = 0 "
            "otherwise)")


class ExposureAudit:
    """Measures every canary's exposure on the models the server holds (see the module).

    ``measure(model, clients)`` ranks the canaries of ``clients`` (all when None) on one
    model: with ``candidates = 0`` one walk of the digit tree scores every candidate for
    all canaries at once; else the same seeded sample of candidates is scored on every
    model, plus each canary itself.
    """

    def __init__(self, cfg: ExposureConfig, data: TextFederation, seed: int) -> None:
        check_exposure(cfg, data)
        self.cfg = cfg
        self.canaries = data.canaries
        self.seq_len = data.seq_len
        self.context = encode(SPEECH_SEPARATOR + cfg.prefix).astype(np.int64)
        self.digit_ids = encode("0123456789").astype(np.int64)
        self.pad = int(encode(" ")[0])
        self.space = 10 ** cfg.digits
        self.sample = (numpy_rng(seed, "privacy", "exposure-candidates").integers(
            0, 10, size=(cfg.candidates, cfg.digits)) if cfg.candidates else None)
        self.global_rows: dict[int, list[dict]] = {}  # round -> one row per canary
        self.upload_rows: list[dict] = []

    @property
    def method(self) -> str:
        return "exact" if self.sample is None else f"sampled ({len(self.sample)} candidates)"

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

    def clients(self) -> set[int]:
        """The clients that hold canaries."""
        return {c.client for c in self.canaries}

    def on_global(self, rnd: int, model: nn.Module) -> None:
        self.global_rows[rnd] = self.measure(model)

    def on_upload(self, rnd: int, cid: int, model: nn.Module) -> None:
        self.upload_rows += [{"round": rnd, **row} for row in self.measure(model, [cid])]

    # -- checkpoints ----------------------------------------------------------------
    def state(self) -> dict:
        return {"global": self.global_rows, "uploads": self.upload_rows}

    def restore(self, state: dict) -> None:
        self.global_rows = {int(k): list(v) for k, v in state["global"].items()}
        self.upload_rows = list(state["uploads"])

    # -- the summary ----------------------------------------------------------------
    def summary(self, client_round: int) -> dict:
        """``privacy.exposure`` of summary.json."""
        final = max(self.global_rows) if self.global_rows else None
        out = {
            "canaries": len(self.canaries),
            "repeats": self.cfg.repeats,
            "clients": sorted(self.clients()),
            "prefix": self.cfg.prefix,
            "digits": self.cfg.digits,
            "space": self.space,
            "max_exposure": math.log2(self.space),
            "method": self.method,
            "global": _block(final, self.global_rows.get(final, [])),
            "global_by_round": [{"round": r, **_stats(rows)}
                                for r, rows in sorted(self.global_rows.items())],
            "upload": _block(client_round, self.upload_rows),
        }
        if not self.upload_rows:
            out["upload"]["why_none"] = (f"no canary client was sampled in round "
                                         f"{client_round} (privacy.client_round)")
        return out


def _stats(rows: list[dict]) -> dict:
    values = [r["exposure"] for r in rows]
    return {"mean": float(np.mean(values)) if values else None,
            "max": float(np.max(values)) if values else None}


def _block(rnd: int | None, rows: list[dict]) -> dict:
    return {"round": rnd, **_stats(rows), "per_canary": rows}


__all__ = ["ExposureAudit", "check_exposure"]
