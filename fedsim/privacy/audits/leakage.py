"""``leakage``: what leaves a client in one round's uploads (``[privacy.leakage]``).

Per kind, how many arrays and values each client uploads (weights, biases, BN running
statistics), and how well its data mean is recovered from uploaded BatchNorm buffers (Huang
et al., NeurIPS 2021; Hatamizadeh et al., IEEE TMI 2023): undoing the running-average update
from what the server sent gives the mean the client's batches had at the first layer with
running statistics, and behind a first conv that mean is linear in the input's
(:func:`mean_through_conv`). The error is compared with guessing the public (global test
set) mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from torch import nn

from fedsim.arrays import record_to_state
from fedsim.config import LeakageConfig, Scenario
from fedsim.privacy.audit_epsilon import AccountantClaim
from fedsim.privacy.audits.base import (
    UPLOADS,
    Audit,
    AuditContext,
    RoundView,
    register_audit,
)
from fedsim.privacy.audits.client_mia import audited_round
from fedsim.privacy.leakage import KINDS, input_stats_from_bn, uploaded_arrays


@register_audit("leakage")
class Leakage(Audit):
    """The uploaded arrays by kind, and the data mean recovered from BN buffers."""

    summary = {"leakage": ""}

    @classmethod
    def needs(cls, scenario: Scenario, options: LeakageConfig) -> frozenset[str]:
        return frozenset({UPLOADS})

    @classmethod
    def check(cls, ctx: AuditContext, options: LeakageConfig) -> None:
        audited_round("leakage.round", options.round, ctx.scenario)

    def __init__(self, ctx: AuditContext, options: LeakageConfig) -> None:
        super().__init__(ctx, options)
        self.round = audited_round("leakage.round", options.round, ctx.scenario)
        self.model = ctx.new_model()  # its structure: which arrays are what
        self.rows: list[dict] = []

    def observe(self, view: RoundView) -> None:
        if view.round != self.round:
            return
        sent = record_to_state(view.sent)
        for upload in view.uploads:
            self.rows.append(self._client(upload.client, record_to_state(upload.arrays), sent))

    def state(self) -> dict:
        return {"rows": self.rows}

    def restore(self, state: dict) -> None:
        self.rows = list(state["rows"])

    def _client(self, cid: int, state: dict, sent: dict) -> dict:
        rows = uploaded_arrays(self.model, keys=list(state))
        kinds = {k: {"arrays": 0, "values": 0} for k in KINDS}
        for row in rows:
            kinds[row["kind"]]["arrays"] += 1
            kinds[row["kind"]]["values"] += int(np.prod(row["shape"], dtype=np.int64))
        out = {"client": cid, "uploaded": {k: v for k, v in kinds.items() if v["arrays"]}}
        leaked = input_stats_from_bn(self.model, state, prev_state=sent)
        x = self.ctx.data.client_train(cid)[0].double()
        dims = [0, *range(2, x.dim())]
        true_mean, true_std = x.mean(dim=dims), x.std(dim=dims)
        if leaked is None:
            out["recovery"] = None
            return out
        if leaked.applies_to == "input":
            guess, method = leaked.mean, "direct"
        else:
            name, first = next((n, m) for n, m in self.model.named_modules()
                               if not list(m.children()))
            if not isinstance(first, nn.Conv2d):
                out["recovery"] = {"layer": leaked.module, "applies_to": leaked.applies_to,
                                   "error": f"cannot invert a first {type(first).__name__}"}
                return out
            guess, method = mean_through_conv(first, sent, name, leaked.mean,
                                              tuple(self.ctx.data.input_shape))
        public = self.ctx.on_device.global_test()[0].double().mean(dim=dims).cpu()
        out["recovery"] = {
            "layer": leaked.module,
            "applies_to": leaked.applies_to,
            "method": method,
            "batches": leaked.num_batches,
            "abs_error": float((guess.cpu() - true_mean).abs().mean()),
            "relative_error": float(((guess.cpu() - true_mean).abs() / true_std).mean()),
            "baseline_abs_error": float((public - true_mean).abs().mean()),
        }
        return out

    def finish(self, final: ArrayRecord, accountants: Sequence[AccountantClaim]) -> dict:
        uploaded = self.rows[0]["uploaded"] if self.rows else {}
        rec = [r["recovery"] for r in self.rows if r["recovery"] is not None]
        summary: dict = {
            "round": self.round,
            "norm": self.ctx.scenario.model.norm,
            "uploaded": uploaded,
            "running_stats_uploaded": any(k in uploaded for k in ("running_mean", "running_var")),
        }
        if not rec:
            summary["data_mean_recovery"] = None
            summary["reason"] = ("no layer with running statistics among the uploaded arrays"
                                 if not summary["running_stats_uploaded"] else
                                 "the first layer with running statistics is too deep")
        elif any("error" in r for r in rec):
            summary["data_mean_recovery"] = None
            summary["reason"] = rec[0]["error"]
        else:
            summary["data_mean_recovery"] = {
                "layer": rec[0]["layer"],
                "applies_to": rec[0]["applies_to"],
                "method": rec[0]["method"],
                "clients": len(rec),
                "abs_error": float(np.mean([r["abs_error"] for r in rec])),
                "relative_error": float(np.mean([r["relative_error"] for r in rec])),
                "baseline_abs_error": float(np.mean([r["baseline_abs_error"] for r in rec])),
            }
        return {"leakage": summary}


def mean_through_conv(conv: nn.Conv2d, state: dict, name: str, out_mean: torch.Tensor,
                      input_shape: tuple[int, int, int]) -> tuple[torch.Tensor, str]:
    """Per-channel input mean from the per-channel mean of a first conv's output.

    The output mean is linear in the means of the zero-padded input under each kernel tap:
    ``mean_out[o] = b[o] + Σ_{i,u,v} W[o,i,u,v] · μ[i,u,v]``. For a stride-1 conv with "same"
    padding and at least as many output channels as taps, ``"taps"`` solves for every ``μ`` by
    least squares and reads the centre tap, whose mean is exactly the image mean. Otherwise
    ``"constant"`` assumes each input channel constant (``μ[i,u,v]`` = its mean, zero padding
    included), an approximation. Both use the conv weights the server sent (those of the
    client's first local batch), so they are exact for one batch and approximate after more.
    """
    c, h, w = input_shape
    weight = state[f"{name}.weight"].double()
    bias = state.get(f"{name}.bias")
    rhs = out_mean.double() - (bias.double() if bias is not None else 0.0)
    out_ch, _, kh, kw = weight.shape
    same = (conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and kh % 2 == 1 and kw % 2 == 1 and conv.padding == (kh // 2, kw // 2))
    if same and out_ch >= c * kh * kw:
        taps = torch.linalg.lstsq(weight.reshape(out_ch, -1), rhs[:, None]).solution[:, 0]
        return taps.reshape(c, kh, kw)[:, kh // 2, kw // 2], "taps"
    ones = torch.eye(c, dtype=torch.float64)[:, :, None, None].expand(c, c, h, w)
    resp = F.conv2d(ones, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    a = resp.mean(dim=(2, 3)).T  # (out channels, in channels)
    return torch.linalg.lstsq(a, rhs[:, None]).solution[:, 0], "constant"
