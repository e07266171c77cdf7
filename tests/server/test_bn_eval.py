"""model.bn_eval = "batch" wherever the global model is evaluated: server-side evaluation,
federated evaluation on clients, personalized evaluation (participating and holdout), one
client at a time and in vectorized cohorts."""

import json

import pytest
import torch

import fedsim
from fedsim.client.train import evaluate
from fedsim.config import load_scenario
from fedsim.context import RunContext

RUN = ["server.rounds=2", "partition.num_clients=8", "server.clients_per_round=3",
       "partition.holdout_clients=0.25", "model.width=8", "model.norm=bn", "client.epochs=1",
       "server.strategy=fedbn", "server.fraction_evaluate=0.5", "model.bn_eval=batch"]


def test_batch_statistics_evaluation_everywhere_sequential_and_vectorized(tmp_path):
    a = fedsim.run("scenarios/quickstart.toml", RUN, out=tmp_path / "seq")
    b = fedsim.run("scenarios/quickstart.toml", RUN + ["engine.vectorize=true",
                                                       "engine.cohort_size=2"],
                   out=tmp_path / "vec")
    run = RunContext.build(load_scenario("scenarios/quickstart.toml", RUN))
    model = run.new_model()
    model.load_state_dict(torch.load(a.path / "model.pt", weights_only=True))
    loss, acc, _ = evaluate(model, *run.data.global_test(), bn_eval="batch")
    final = a.summary["final"]
    assert final["global_test_accuracy"] == acc and final["global_test_loss"] == loss
    assert evaluate(model, *run.data.global_test())[0] != pytest.approx(loss, rel=1e-3)
    assert a.summary["bn_statistics"]["eval"] == "batch"
    fa, fb = (r.summary["final"] for r in (a, b))
    # the two models agree to float rounding (~1e-5): no prediction flips between them, as
    # in the engines' own comparisons (tests/engine/test_engines_agree.py)
    for key in ("personalized_accuracy", "personalized_holdout_accuracy", "client_accuracy",
                "global_test_accuracy"):
        assert fa[key] == fb[key], key
    rows = [json.loads(line) for line in (b.path / "rounds.jsonl").read_text().splitlines()]
    assert all(r["federated_evaluation"] for r in rows[1:])
