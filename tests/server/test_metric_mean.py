"""fedsim.server.metric_mean: Flower's weighted metric mean, value for value."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedsim.server.metric_mean import use_weighted_metrics, weighted_metrics


def _replies(seed: int, n: int, extra_record: bool = False) -> list[RecordDict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        metrics = {"train_loss": float(rng.standard_normal() * 10.0 ** rng.integers(-8, 8)),
                   "steps": int(rng.integers(0, 100)),
                   "per_class": [float(x) for x in rng.standard_normal(3)],
                   "counts": [int(x) for x in rng.integers(0, 9, 2)],
                   "num-examples": int(rng.integers(1, 50))}
        content = RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord(metrics),
                              "client": ConfigRecord({"client-id": i})})
        if extra_record:  # Flower sums every MetricRecord of a reply, weighted by the first's
            content["more"] = MetricRecord({"train_loss": 0.5, "other": i})
        out.append(content)
    return out


@pytest.mark.parametrize("seed,n,extra", [(0, 1, False), (1, 9, False), (2, 100, False),
                                          (3, 4, True)])
def test_weighted_metrics_equal_flowers_exactly(seed, n, extra):
    replies = _replies(seed, n, extra)
    ours = weighted_metrics(replies, "num-examples")
    flowers = aggregate_metricrecords(replies, "num-examples")
    assert list(ours.items()) == list(flowers.items())  # same keys, order and float bits
    assert "num-examples" not in ours


def test_weighted_metrics_fail_as_flowers_do():
    replies = _replies(4, 3)
    replies[1]["metrics"]["per_class"] = [1.0, 2.0]  # a list of another length
    for fn in (aggregate_metricrecords, weighted_metrics):
        with pytest.raises(ValueError):
            fn(replies, "num-examples")


def test_only_flowers_default_is_replaced():
    def mine(records, key):
        return MetricRecord()

    default = use_weighted_metrics(FedAvg())
    assert default.train_metrics_aggr_fn is weighted_metrics
    assert default.evaluate_metrics_aggr_fn is weighted_metrics
    custom = use_weighted_metrics(FedAvg(train_metrics_aggr_fn=mine))
    assert custom.train_metrics_aggr_fn is mine
    assert custom.evaluate_metrics_aggr_fn is weighted_metrics
