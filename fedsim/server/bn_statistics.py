"""The global BatchNorm running statistics after aggregation (``server.bn_statistics``).

A step of the round loop (:func:`fedsim.server.loop.run_rounds`) right after the strategy's
``aggregate_train``, so it works the same for every strategy (Flower's, fedsim's, a user's)
and every engine. It replaces the running mean and variance of every BN layer (BN, hybrid:
:func:`fedsim.models.bn_statistics.is_bn_layer`) whose statistics the round's clients
uploaded; parameters and ``num_batches_tracked`` stay as the strategy aggregated them.

- ``"average"``: nothing is replaced. Flower's FedAvg averages the clients' running
  statistics like any array (weighted by their sample counts); other strategies do what
  they do with them (FedAdam treats them as updates, FedMedian takes medians).
- ``"pooled"``: the train config asks each client (:data:`~fedsim.client.messages.
  BN_MOMENTS_KEY`) to upload, in place of its running statistics, the exact per-channel
  mean and (unbiased) variance of each BN layer's input over its training data under the
  weights it trained, with the count of values behind them (:mod:`fedsim.client.bn_moments`);
  the server pools the accepted replies with the law of total variance,
  μ = Σ w_k μ_k, σ² = Σ w_k σ²_k + Σ w_k (μ_k − μ)², w_k ∝ n_k — the statistics of the
  concatenation of the clients' layer inputs, each client's under its own model.
- ``"recalibrate"``: the clients whose updates were accepted re-estimate the statistics of the
  *new* global weights (forward passes only): one query message per BN layer, in the order the
  forward pass calls them (:data:`~fedsim.client.messages.BN_MOMENTS`), each carrying the
  global arrays with every earlier layer already recalibrated, each answered with the exact
  moments of that layer's input over the client's training data; the server pools them as
  above. The result is what one centralized pass over the union of those clients' training
  data would give the global model, layer by layer (Hsieh et al., ICML 2020, and FixBN,
  Zhong et al. 2023, on why averaged statistics miss the federation's).

Strategies whose clients keep BN statistics local (FedBN, SiloBN) have nothing to pool:
:func:`fedsim.validate.check_bn_statistics` refuses "pooled" and "recalibrate" with them.
FixBN uploads statistics during its warm-up only; afterwards no client uploads them, and the
step leaves the frozen statistics alone (recorded per round), so FixBN freezes the pooled or
recalibrated statistics of its last warm-up round.

**What leaves the clients** (:meth:`BNStatistics.summary`, ``summary.json``
``bn_statistics``): in every mode data-dependent statistics of each BN layer's input, never
noised — a server-side DP wrapper excludes them (``dp.excluded_arrays``), and
"recalibrate"'s query replies are outside every DP guarantee as well.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import nn

from fedsim.arrays import array_record, peek_array, state_to_record
from fedsim.client.bn_moments import statistics_keys
from fedsim.client.compress import record_bytes
from fedsim.client.messages import (
    BN_COUNTS,
    BN_LAYER_KEY,
    BN_MOMENTS,
    BN_MOMENTS_KEY,
    MOMENTS_RECORD,
)
from fedsim.errors import RunStopped
from fedsim.models.bn_statistics import biased, bn_layers, pool_moments, unbiased
from fedsim.records import get_record, require_record

#: seconds to wait for the replies to one recalibration query
REPLY_TIMEOUT = 3600.0

SENT = {
    "average": "each client's running statistics (running_mean, running_var, "
               "num_batches_tracked) after its local training, aggregated by the strategy",
    "pooled": "each client's exact per-channel mean and variance of every BN layer's input "
              "over its training data under its trained weights (in running_mean/running_var),"
              " and their counts (reply record 'bn-counts'); pooled by the law of total "
              "variance",
    "recalibrate": "each client's running statistics after local training (aggregated by the "
                   "strategy, then replaced), and, per BN layer and round, the exact "
                   "per-channel mean, variance and count of that layer's input under the new "
                   "global weights (query replies); pooled by the law of total variance",
}


def _client_id(reply: Message) -> int:
    rec = get_record(reply.content, "client", ConfigRecord)
    return int(rec["client-id"]) if rec is not None and "client-id" in rec else -1


class BNStatistics:
    """The ``server.bn_statistics`` step for one run: :meth:`train_config` joins the train
    config the loop hands the strategy; ``step(round, replies, arrays, grid)`` returns the
    global arrays with the statistics replaced and what it did (``rounds.jsonl``
    ``bn_statistics``)."""

    def __init__(self, mode: str, model: nn.Module, inputs: torch.Tensor | Sequence[int],
                 bn_eval: str = "running") -> None:
        self.mode = mode
        self.bn_eval = bn_eval
        self.layers = [name for name, _ in bn_layers(model, inputs)]
        self.seconds = 0.0

    def train_config(self) -> dict:
        """Train-config entries the clients need ("pooled": upload exact moments)."""
        return {BN_MOMENTS_KEY: 1} if self.mode == "pooled" and self.layers else {}

    def step(self, rnd: int, replies: Sequence[Message], arrays: ArrayRecord, grid: Grid
             ) -> tuple[ArrayRecord, dict | None]:
        """The global ``arrays`` after this round's step, and its record (None: the model has
        no BN layer, nothing to record); :attr:`seconds`: what the step took (wall clock,
        kept out of the record so that a resumed run's records equal an uninterrupted one's)."""
        self.seconds = 0.0
        if not self.layers:
            return arrays, None
        record: dict = {"mode": self.mode}
        if self.mode == "average":
            return arrays, record
        replies = sorted(replies, key=_client_id)  # pooled in client order on every engine
        layers = [n for n in self.layers if replies and all(
            k in require_record(r.content, "arrays", ArrayRecord)
            for r in replies for k in statistics_keys(n))]
        if not layers:
            record.update(applied=False, reason="no client uploaded the running statistics "
                          "of any BN layer this round (the strategy keeps them, e.g. FixBN "
                          "after its warm-up): left as they are")
            return arrays, record
        t0 = time.perf_counter()
        if self.mode == "pooled":
            arrays = self._pooled(rnd, replies, arrays, layers)
        else:
            arrays = self._recalibrated(rnd, replies, arrays, layers, grid, record)
        record.update(applied=True, layers=len(layers), clients=len(replies))
        self.seconds = time.perf_counter() - t0
        return arrays, record

    # -- pooled ------------------------------------------------------------------------
    def _pooled(self, rnd: int, replies: Sequence[Message], arrays: ArrayRecord,
                layers: list[str]) -> ArrayRecord:
        counts = []
        for reply in replies:
            rec = get_record(reply.content, BN_COUNTS, ConfigRecord)
            missing = [n for n in layers if rec is None or n not in rec]
            if missing:
                raise RunStopped(
                    f"round {rnd}: server.bn_statistics = 'pooled', but client "
                    f"{_client_id(reply)}'s reply has no exact moments of BN layer(s) "
                    f"{missing}: the strategy's configure_train must pass on the config the "
                    f"round loop gives it ({BN_MOMENTS_KEY!r} = 1), as Flower's strategies do",
                    round=rnd)
            counts.append(rec)
        out = {}
        for name in layers:
            n = torch.tensor([float(c[name]) for c in counts], dtype=torch.float64)
            mean_key, var_key = statistics_keys(name)
            means = torch.stack([_tensor(r, mean_key) for r in replies])
            variances = biased(n, torch.stack([_tensor(r, var_key) for r in replies]))
            out[name] = pool_moments(n, means, variances)
        return _with_statistics(arrays, out)

    # -- recalibrate -------------------------------------------------------------------
    def _recalibrated(self, rnd: int, replies: Sequence[Message], arrays: ArrayRecord,
                      layers: list[str], grid: Grid, record: dict) -> ArrayRecord:
        nodes = [r.metadata.src_node_id for r in replies]
        down = up = 0
        failures: list[dict] = []
        for name in layers:
            content = RecordDict({"arrays": arrays, "config": ConfigRecord(
                {BN_LAYER_KEY: name, "server-round": rnd})})
            msgs = [Message(content, node, BN_MOMENTS) for node in nodes]
            down += record_bytes(arrays) * len(msgs)
            answers = list(grid.send_and_receive(msgs, timeout=REPLY_TIMEOUT))
            if len(answers) < len(msgs):
                failures.append({"layer": name, "reason": f"{len(msgs) - len(answers)} "
                                 f"client(s) did not answer within {REPLY_TIMEOUT:g} s"})
            parts = []
            for answer in answers:
                if answer.has_error():
                    failures.append({"layer": name, "reason": answer.error.reason})
                    continue
                moments = require_record(answer.content, MOMENTS_RECORD, ArrayRecord)
                up += record_bytes(moments)
                count = int(require_record(answer.content, "client", ConfigRecord)["count"])
                parts.append((_client_id(answer), count, moments))
            if not parts:  # every query failed: the layer keeps the strategy's aggregate
                continue
            parts.sort(key=lambda p: p[0])
            n = torch.tensor([float(c) for _, c, _ in parts], dtype=torch.float64)
            means = torch.stack([torch.from_numpy(np.array(peek_array(m["mean"])))
                                 for _, _, m in parts])
            variances = torch.stack([torch.from_numpy(np.array(peek_array(m["var"])))
                                     for _, _, m in parts])
            arrays = _with_statistics(arrays, {name: pool_moments(n, means, variances)})
        record.update(messages=len(layers) * len(nodes), bytes_downloaded=down,
                      bytes_uploaded=up)
        if failures:
            record["failures"] = failures
        return arrays

    def summary(self, rounds: Iterable[dict] = ()) -> dict:
        """``summary.json`` ``bn_statistics``: the modes, the layers, what the clients sent
        (never noised) and in how many rounds the step replaced the statistics."""
        recs = [r.get("bn_statistics") or {} for r in rounds if r.get("round", 0) >= 1]
        keys = [k for n in self.layers for k in statistics_keys(n)]
        return {
            "mode": self.mode,
            "eval": self.bn_eval,
            "layers": list(self.layers),
            "statistics_keys": keys,
            "sent": SENT[self.mode],
            "noised": False,
            "note": "data-dependent statistics of every BN layer's input leave the clients "
                    "without noise in every mode: outside any DP guarantee",
            "rounds_applied": sum(1 for r in recs if r.get("applied")),
            "bytes_downloaded": sum(r.get("bytes_downloaded", 0) for r in recs),
            "bytes_uploaded": sum(r.get("bytes_uploaded", 0) for r in recs),
        }


def _tensor(reply: Message, key: str) -> torch.Tensor:
    arrays = require_record(reply.content, "arrays", ArrayRecord)
    return torch.from_numpy(np.array(peek_array(arrays[key]), dtype=np.float64))


def _with_statistics(arrays: ArrayRecord, pooled: dict[str, tuple]) -> ArrayRecord:
    """``arrays`` with each layer's running mean and (unbiased) variance set from its pooled
    (count, mean, biased variance), in the arrays' own dtype and order."""
    new = {}
    for name, (count, mean, var) in pooled.items():
        mean_key, var_key = statistics_keys(name)
        new[mean_key] = mean
        new[var_key] = unbiased(count, var)
    cast = {k: v.numpy().astype(peek_array(arrays[k]).dtype) for k, v in new.items()}
    replaced = state_to_record(cast)
    return array_record({k: replaced[k] if k in replaced else arrays[k] for k in arrays})
