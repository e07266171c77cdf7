"""Engines that record which node is which client: the local Deployment Engine reads each
SuperNode's id from its log, the ServerApp gets the mapping through the run config, and no
node is asked (tests/engine/test_ray_discovery.py does the same for Ray)."""

import json
import shutil

import pytest

import fedsim
from fedsim.compat import RegisteredNodes
from fedsim.engine.deploy import LocalDeployment, run_deployed
from fedsim.engine.known_nodes import (
    NODE_PARTITIONS_KEY,
    KnownNodesGrid,
    with_recorded_partitions,
    write_node_partitions,
)

ROOT = fedsim.__file__.rsplit("/fedsim/", 1)[0]


def _log(node_id: int) -> bytes:
    return (b"\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode\n"
            b"\x1b[92mINFO \x1b[0m:      SuperNode ID: %d\n" % node_id)


def test_node_partitions_are_read_from_the_supernode_logs(tmp_path):
    dep = LocalDeployment(3, workdir=tmp_path)
    for i, node in enumerate((88, 17, 9_223_372_036_854_775_807)):
        (tmp_path / f"supernode-{i}.log").write_bytes(_log(node))
    assert dep.node_partitions(timeout=0) == {88: 0, 17: 1, 9_223_372_036_854_775_807: 2}
    (tmp_path / "supernode-1.log").write_bytes(b"INFO: Starting Flower SuperNode\n")
    assert dep.node_partitions(timeout=0.2) is None  # not registered: the nodes are asked


def test_the_run_config_file_gives_the_grid_client_ids(tmp_path):
    path = write_node_partitions(tmp_path / "p.json", {88: 0, 17: 1, 5: 2})
    base = object()
    assert with_recorded_partitions(base, {NODE_PARTITIONS_KEY: ""}, (0, 2, 3)) is base
    grid = with_recorded_partitions(base, {NODE_PARTITIONS_KEY: str(path)}, (0, 2, 3))
    assert isinstance(grid, KnownNodesGrid) and grid.base is base
    assert grid.client_ids() == {88: 0, 17: 2, 5: 3}  # partition i → participating[i]
    nodes = RegisteredNodes()
    nodes.record({1: 0})
    with pytest.raises(RuntimeError, match="registered 1 nodes for 3 participating clients"):
        KnownNodesGrid(base, nodes, (0, 2, 3)).client_ids()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="flwr CLI not installed")
def test_a_deployed_run_asks_no_node_and_samples_as_in_process(tmp_path):
    sc = ["partition.num_clients=4", "partition.holdout_clients=0.25",
          "server.clients_per_round=2", "server.rounds=1", "client.epochs=1"]
    out = run_deployed(f"{ROOT}/scenarios/quickstart.toml", tmp_path / "deployed", sc,
                       app_dir=ROOT, timeout=400, workdir=tmp_path / "work")
    logs = "".join(p.read_text(errors="replace")
                   for p in (tmp_path / "work").glob("supernode-*.log"))
    assert "Receiving: query" not in logs and "Receiving: train" in logs
    local = fedsim.run(f"{ROOT}/scenarios/quickstart.toml", sc, out=tmp_path / "inprocess")

    def sampled(folder):
        lines = (folder / "rounds.jsonl").read_text().splitlines()
        return [json.loads(line).get("clients") for line in lines]

    assert sampled(out) == sampled(local.path) and any(sampled(out))
