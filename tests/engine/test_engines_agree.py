"""The in-process engine and Flower's Ray engine train the same global model."""

import json

import pytest
import torch

import fedsim

SCENARIO = ["partition.num_clients=4", "server.clients_per_round=2",
            "partition.holdout_clients=0.0", "model.norm=bn"]


def rounds(result) -> list[str]:
    return (result.path / "rounds.jsonl").read_text().splitlines()


POISSON_DP = ["server.dp.kind=fixed", "server.dp.sampling=poisson",
              "server.dp.noise_multiplier=0.3"]


RECALIBRATE = ["server.bn_statistics=recalibrate"]
FEDBN_HOLDOUT = ["partition.holdout_clients=0.25"]


@pytest.mark.parametrize("strategy,num_rounds,extra", [
    ("fedavg", 2, RECALIBRATE), ("scaffold", 3, []), ("fedbn", 3, FEDBN_HOLDOUT),
    ("fedavg", 3, POISSON_DP),
], ids=["fedavg-recalibrate", "scaffold", "fedbn", "fedavg-poisson-dp"])
def test_inprocess_and_ray_agree(tmp_path, strategy, num_rounds, extra):
    """FedAvg, and two strategies whose clients keep state in Context.state between rounds
    (SCAFFOLD's control variates, FedBN's local BN layers; with 3 rounds of 2 of 4 clients
    some client trains again and must find its state): on Ray that state lives in Flower's
    own node states, in-process in fedsim's store, and the models agree, as do FedBN's
    personalized models of clients that trained and of a holdout client. Recalibration's query
    messages (query.bn_moments) reach the ClientApp on Ray as in-process: the same
    recalibrated model and round records. Under DP with Poisson sampling the DP wrapper
    draws the cohorts over clients in id order: the same on both."""
    sc = SCENARIO + [f"server.strategy={strategy}", f"server.rounds={num_rounds}", *extra]
    a = fedsim.run("scenarios/quickstart.toml", sc, out=tmp_path / "inprocess")
    b = fedsim.run("scenarios/quickstart.toml", sc + ["engine.kind=ray"], out=tmp_path / "ray")
    sa = torch.load(a.path / "model.pt", weights_only=True)
    sb = torch.load(b.path / "model.pt", weights_only=True)
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.allclose(sa[key].double(), sb[key].double(), atol=1e-5), key
    assert a.summary["final"]["global_test_accuracy"] == b.summary["final"]["global_test_accuracy"]
    assert len(rounds(a)) == len(rounds(b)) == num_rounds + 1
    if strategy != "fedavg":  # state was kept and found again
        for key in ("personalized_accuracy", "personalized_holdout_accuracy", "client_accuracy"):
            assert a.summary["final"].get(key) == b.summary["final"].get(key), key
    if strategy == "fedbn":
        assert a.summary["final"]["personalized_holdout_accuracy"] is not None
    if extra == RECALIBRATE:
        ra, rb = ([json.loads(line)["bn_statistics"] for line in rounds(r)[1:]] for r in (a, b))
        assert ra == rb == [{"mode": "recalibrate", "applied": True, "layers": 2, "clients": 2,
                             "messages": 4, "bytes_downloaded": ra[0]["bytes_downloaded"],
                             "bytes_uploaded": ra[0]["bytes_uploaded"]}] * 2
