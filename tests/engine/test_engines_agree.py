"""The in-process engine and Flower's Ray engine train the same global model."""

import torch

import fedsim

SCENARIO = ["server.rounds=2", "partition.num_clients=4", "server.clients_per_round=2",
            "partition.holdout_clients=0.0", "model.norm=bn"]


def test_inprocess_and_ray_agree_after_two_rounds(tmp_path):
    a = fedsim.run("scenarios/quickstart.toml", SCENARIO, out=tmp_path / "inprocess")
    b = fedsim.run("scenarios/quickstart.toml", SCENARIO + ["engine.kind=ray"],
                   out=tmp_path / "ray")
    sa = torch.load(a.path / "model.pt", weights_only=True)
    sb = torch.load(b.path / "model.pt", weights_only=True)
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.allclose(sa[key].double(), sb[key].double(), atol=1e-5), key
    assert a.summary["final"]["global_test_accuracy"] == b.summary["final"]["global_test_accuracy"]
    rounds = lambda r: [line for line in (r.path / "rounds.jsonl").read_text().splitlines()]  # noqa: E731
    assert len(rounds(a)) == len(rounds(b)) == 3
