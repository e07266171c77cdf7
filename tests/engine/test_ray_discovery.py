"""Flower's Ray engine: the ServerApp learns which node is which client from the node
registration the engine records (fedsim.engine.ray), not from a query message per node."""

import json

import pytest
from flwr.app import MessageType
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

import fedsim

SCENARIO = ["partition.num_clients=7", "partition.holdout_clients=0.3",
            "server.clients_per_round=2", "server.rounds=2", "client.epochs=1"]


def sampled(result) -> list:
    lines = (result.path / "rounds.jsonl").read_text().splitlines()
    return [json.loads(line).get("clients") for line in lines]


@pytest.mark.slow
def test_ray_sends_no_query_and_samples_as_in_process(tmp_path, pushed_types):
    pushed = pushed_types(InMemoryGrid)
    ray = fedsim.run("scenarios/quickstart.toml", [*SCENARIO, "engine.kind=ray"],
                     out=tmp_path / "ray")
    assert MessageType.QUERY not in pushed and MessageType.TRAIN in pushed
    local = fedsim.run("scenarios/quickstart.toml", SCENARIO, out=tmp_path / "inprocess")
    assert sampled(ray) == sampled(local) and any(sampled(ray))
    # 2 of 7 clients held out: participating ids are not the partition ids, so a node
    # mapped by partition id alone would have sampled (and trained) other clients
    assert (ray.summary["final"]["global_test_accuracy"]
            == local.summary["final"]["global_test_accuracy"])


SYNTHETIC = ["partition.num_clients=40", "partition.holdout_clients=0.25",
             "server.clients_per_round=4", "server.rounds=2", "engine.vectorize=false"]


@pytest.mark.slow
def test_a_synthetic_population_on_ray_draws_the_same_clients_and_data_as_in_process(tmp_path):
    """Clients drawn from (seed, client id) in Ray's worker processes, holdout by the keyed
    permutation: the same sampled clients, holdout clients and results as in-process."""
    ray = fedsim.run("scenarios/thousand_clients.toml", [*SYNTHETIC, "engine.kind=ray"],
                     out=tmp_path / "ray")
    local = fedsim.run("scenarios/thousand_clients.toml", SYNTHETIC, out=tmp_path / "local")
    assert sampled(ray) == sampled(local) and any(sampled(ray))
    final_ray, final_local = ray.summary["final"], local.summary["final"]
    for key in ("global_test_accuracy", "client_accuracy",  # clients' own data, on Ray
                "personalized_holdout_accuracy"):  # the holdout clients, on the server
        assert final_ray[key] == final_local[key], key
