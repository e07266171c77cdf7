"""server.bn_statistics and model.bn_eval on the device: recalibrated statistics equal the
centralized float64 pass over the union (as on the CPU, tests/server/test_bn_statistics.py),
and the sequential and vectorized engines agree with every mode."""

import pytest
import torch
from bn_reference import assert_recalibrated, rounds  # tests/bn_reference.py

import fedsim

TINY = ["server.rounds=2", "partition.num_clients=6", "server.clients_per_round=4",
        "partition.holdout_clients=0.0", "model.width=8", "model.norm=bn", "client.epochs=1",
        "output.eval_clients=2"]


@pytest.mark.parametrize("extra", [["server.bn_statistics=recalibrate"],
                                   ["server.bn_statistics=pooled", "model.bn_eval=batch"]],
                         ids=["recalibrate", "pooled-batch-eval"])
def test_bn_statistics_on_device_sequential_and_vectorized(tmp_path, on_device, extra):
    sc = TINY + extra
    a = fedsim.run("scenarios/quickstart.toml", sc + on_device, out=tmp_path / "seq")
    b = fedsim.run("scenarios/quickstart.toml", sc + on_device + ["engine.vectorize=true",
                                                                  "engine.cohort_size=3"],
                   out=tmp_path / "vec")
    for result in (a, b):
        assert all(r["bn_statistics"]["applied"] for r in rounds(result.path)[1:])
        if "server.bn_statistics=recalibrate" in extra:
            assert_recalibrated(result.path, sc)
    sa = torch.load(a.path / "model.pt", weights_only=True, map_location="cpu")
    sb = torch.load(b.path / "model.pt", weights_only=True, map_location="cpu")
    for k in sa:  # the bound of the CPU's whole-run comparisons
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-3, atol=1e-3)
    assert a.summary["final"]["global_test_accuracy"] == pytest.approx(
        b.summary["final"]["global_test_accuracy"], abs=0.02)
