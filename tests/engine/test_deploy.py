"""Flower's Deployment Engine: a real SuperLink and two SuperNodes on 127.0.0.1."""

import json
import shutil
from pathlib import Path

import pytest

from fedsim.engine.deploy import LocalDeployment
from fedsim.engine.processes import alive, descendants

ROOT = Path(__file__).resolve().parents[2]
TWO_CLIENTS = """name = "deploy-two"
seed = 0
[partition]
kind = "dirichlet"
num_clients = 2
[client]
epochs = 1
[server]
rounds = 2
clients_per_round = 2
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="flwr CLI not installed")
def test_two_rounds_through_superlink_and_two_supernodes_with_recalibrated_bn(tmp_path):
    """Two rounds of a BN model on a real SuperLink and two SuperNodes (one deployment, the
    suite's costliest start-up, serves both checks): every round reaches the progress line
    and rounds.jsonl, the run ends with its summary and model and no process left, and with
    server.bn_statistics = "recalibrate" the SuperNodes' ClientApp answers the
    query.bn_moments messages, so every round's statistics are recalibrated."""
    scenario = tmp_path / "two.toml"
    scenario.write_text(TWO_CLIENTS + 'bn_statistics = "recalibrate"\n[model]\nnorm = "bn"\n')
    out = tmp_path / "results"
    dep = LocalDeployment(num_nodes=2, workdir=tmp_path / "deploy")
    seen = []
    try:
        dep.start(timeout=60)
        result = dep.run(ROOT, {"scenario": str(scenario), "out": str(out)}, timeout=240,
                         on_round=seen.append)
        assert result.returncode == 0, dep.logs()
        assert (out / "summary.json").is_file(), dep.logs()
        tree = descendants([p.pid for p in dep.procs])  # SuperExecs in sessions of their own
    finally:
        dep.stop()
    assert not dep.procs and not [p for p in tree if alive(p)]
    assert [r["round"] for r in seen] == [0, 1, 2]  # the progress line saw every round
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["updates"] == 2 and r["clients"] == [0, 1] for r in rounds[1:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["global_test_accuracy"] > rounds[0]["global_test_accuracy"]
    assert (out / "model.pt").is_file()
    assert [r["bn_statistics"] for r in rounds[1:]] == [
        {**rounds[1]["bn_statistics"], "mode": "recalibrate", "applied": True, "layers": 2,
         "clients": 2, "messages": 4}] * 2
    assert summary["bn_statistics"]["rounds_applied"] == 2
