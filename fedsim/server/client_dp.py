"""What the server records of its clients' DP-SGD (``[client.dp]``): each client's ε so far.

Every DP-SGD reply carries the client's ε over all rounds it took part in
(:mod:`fedsim.client.dpsgd`). A round's record keeps them by client (``client_dp``) and their
maximum (``client_dp_epsilon_max``); ``summary.json`` ``client_dp`` summarizes each client's
latest ε over the clients that trained.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord

from fedsim.client import dpsgd
from fedsim.config import Scenario
from fedsim.privacy.accountant import ACCOUNTANT
from fedsim.records import get_record, records_of


def _span(values: list[float]) -> dict | None:
    return {"min": min(values), "max": max(values)} if values else None


def round_client_dp(replies: Iterable[Message]) -> dict:
    """This round's ``client_dp`` record entries from the accepted replies ({} without DP-SGD)."""
    eps, sigma, rate = {}, [], []
    for reply in replies:
        # the first MetricRecord, read without building the metric_records view per reply
        metrics = next((r for _, r in records_of(reply.content, MetricRecord)), None)
        if metrics is None or dpsgd.EPSILON_METRIC not in metrics:
            continue
        client = get_record(reply.content, "client", ConfigRecord) or ConfigRecord()
        eps[str(client.get("client-id", len(eps)))] = float(metrics[dpsgd.EPSILON_METRIC])
        sigma.append(float(metrics[dpsgd.NOISE_METRIC]))
        rate.append(float(metrics[dpsgd.RATE_METRIC]))
    if not eps:
        return {}
    return {"client_dp_epsilon_max": max(eps.values()),
            "client_dp": {"epsilon": eps, "noise_multiplier": _span(sigma),
                          "sampling_rate": _span(rate)}}


def summarize_client_dp(rounds: list[dict], scenario: Scenario) -> dict | None:
    """``summary.json`` ``client_dp``: ε.{max, mean, p90} over each trained client's latest ε,
    with the noise multiplier and sampling rate ({min, max} over clients) and C, δ."""
    latest: dict[str, float] = {}
    sigma: list[float] = []
    rate: list[float] = []
    for record in rounds:
        entry = record.get("client_dp")
        if not entry:
            continue
        latest.update(entry["epsilon"])
        for key, into in (("noise_multiplier", sigma), ("sampling_rate", rate)):
            if entry.get(key):
                into += [entry[key]["min"], entry[key]["max"]]
    if not latest:
        return None
    eps = np.array(list(latest.values()))
    cfg = scenario.client.dp
    return {
        "epsilon": {"max": float(eps.max()), "mean": float(eps.mean()),
                    "p90": float(np.percentile(eps, 90)), "clients": len(eps)},
        "noise_multiplier": _span(sigma),
        "max_grad_norm": cfg.max_grad_norm,
        "delta": cfg.delta,
        "sampling_rate": _span(rate),
        "target_epsilon": cfg.target_epsilon or None,
        "accountant": f"{ACCOUNTANT}; one Poisson-subsampled Gaussian per local step",
        "assumes": "each local batch Poisson-sampled at sampling_rate; covers the uploaded "
                   "arrays, not the training loss/accuracy or the sample count clients report",
    }
