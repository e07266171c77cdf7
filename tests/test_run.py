"""End to end: a scenario runs a Flower federation and writes a complete results folder."""

import json

import pytest
import torch

import fedsim
from fedsim.errors import ScenarioError

TINY = ["server.rounds=2", "partition.num_clients=6", "server.clients_per_round=3",
        "partition.holdout_clients=0.2", "client.epochs=1"]


def rounds_of(path):
    return [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()]


def metrics_only(records):
    drop = {"seconds", "train_seconds"}
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "res"
    return fedsim.run("scenarios/quickstart.toml", TINY + ["model.norm=hybrid"], out=out)


def test_results_folder_is_complete(tiny_run):
    path = tiny_run.path
    for name in ("scenario.toml", "rounds.jsonl", "summary.json", "model.pt",
                 "learning_curves.png"):
        assert (path / name).is_file(), name
    records = rounds_of(path)
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert len(r["clients"]) == 3 and r["updates"] == 3 and r["failures"] == []
        assert r["train_loss"] > 0 and 0 <= r["global_test_accuracy"] <= 1
        assert set(r["client_accuracy"]) >= {"mean", "weighted_mean", "std", "median", "p10",
                                             "p90"}
        assert r["hybrid_alpha"] and all(0 < a < 1 for a in r["hybrid_alpha"].values())
    summary = json.loads((path / "summary.json").read_text())
    assert summary == tiny_run.summary
    assert summary["final"]["global_test_accuracy"] == records[-1]["global_test_accuracy"]
    for key in ("mean", "std", "p10", "p90"):
        assert key in summary["final"]["client_accuracy"]
    assert summary["timing"]["client_updates_per_s"] > 0
    assert summary["timing"]["client_updates"] == 6
    assert summary["generalization"]["participation_gap"] is not None
    resolved = fedsim.load_scenario(path / "scenario.toml")
    assert resolved.model.norm == "hybrid" and resolved.server.rounds == 2


def test_model_pt_loads_without_pickles(tiny_run):
    state = torch.load(tiny_run.path / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    from fedsim.context import build_global_model
    from fedsim.data.federated import build_federated_data

    scn = fedsim.load_scenario(tiny_run.path / "scenario.toml")
    model = build_global_model(scn, build_federated_data(scn))
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state)


def test_holdout_clients_never_train(tiny_run):
    from fedsim.data.federated import build_federated_data

    scn = fedsim.load_scenario(tiny_run.path / "scenario.toml")
    data = build_federated_data(scn)
    assert len(data.holdout) == 1
    trained = {c for r in rounds_of(tiny_run.path) for c in r.get("clients", [])}
    assert trained and not trained & set(data.holdout)
    for r in rounds_of(tiny_run.path)[1:]:  # no round's sample holds a holdout client
        assert not set(r["clients"]) & set(data.holdout)


def test_participation_gap_is_measured_on_the_clients_that_never_trained(tiny_run):
    from fedsim.context import build_global_model
    from fedsim.data.federated import build_federated_data
    from fedsim.server.evaluate import Evaluator

    scn = fedsim.load_scenario(tiny_run.path / "scenario.toml")
    data = build_federated_data(scn)
    model = build_global_model(scn, data)
    evaluator = Evaluator(scn.output, scn.seed, data, model, torch.device("cpu"))
    assert evaluator.holdout == list(data.holdout)
    assert not set(evaluator.holdout) & set(evaluator.clients)
    trained = {c for r in rounds_of(tiny_run.path) for c in r.get("clients", [])}
    assert not trained & set(evaluator.holdout)
    # the gap in summary.json is participating local-test mean minus the holdout mean
    model.load_state_dict(torch.load(tiny_run.path / "model.pt", weights_only=True))
    from fedsim.client.train import evaluate

    hold = [evaluate(model, *data.client_test(c))[1] for c in data.holdout]
    gen = tiny_run.summary["generalization"]
    assert gen["holdout_accuracy"]["n"] == len(data.holdout)
    assert gen["holdout_accuracy"]["mean"] == pytest.approx(sum(hold) / len(hold))
    assert gen["participation_gap"] == pytest.approx(
        tiny_run.summary["final"]["client_accuracy"]["mean"] - sum(hold) / len(hold))


def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    a = fedsim.run("scenarios/quickstart.toml", TINY, out=tmp_path / "a")
    b = fedsim.run("scenarios/quickstart.toml", TINY, out=tmp_path / "b")
    c = fedsim.run("scenarios/quickstart.toml", TINY + ["seed=1"], out=tmp_path / "c")
    assert metrics_only(rounds_of(a.path)) == metrics_only(rounds_of(b.path))
    assert metrics_only(rounds_of(a.path)) != metrics_only(rounds_of(c.path))
    sa = torch.load(a.path / "model.pt", weights_only=True)
    sb = torch.load(b.path / "model.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad",
                                      "fedavgm", "fedmedian", "fedtrimmedavg", "krum"])
def test_every_flower_builtin_runs_with_batchnorm(tmp_path, strategy):
    params = {"fedprox": ["server.params.proximal_mu=0.1"],
              "fedtrimmedavg": ["server.params.beta=0.2"]}.get(strategy, [])
    result = fedsim.run("scenarios/quickstart.toml",
                        ["server.rounds=1", "partition.num_clients=5",
                         "server.clients_per_round=5", "partition.holdout_clients=0.0",
                         "model.norm=bn", f"server.strategy={strategy}", *params],
                        out=tmp_path / strategy)
    state = torch.load(result.path / "model.pt", weights_only=True)
    nbt = [v for k, v in state.items() if k.endswith("num_batches_tracked")]
    # integer again after Flower's float arithmetic; server optimizers (FedAdam, ...) move the
    # counter like any array, so only averaging strategies keep it at the clients' count
    assert nbt and all(v.dtype == torch.int64 and v.item() >= 0 for v in nbt)
    if strategy in ("fedavg", "fedprox", "fedmedian", "fedtrimmedavg", "krum"):
        assert all(v.item() > 0 for v in nbt)
    assert result.summary["final"]["global_test_accuracy"] is not None


def test_fedprox_with_mu_zero_equals_fedavg(tmp_path):
    base = TINY + ["model.norm=bn"]
    a = fedsim.run("scenarios/quickstart.toml", base, out=tmp_path / "avg")
    b = fedsim.run("scenarios/quickstart.toml",
                   base + ["server.strategy=fedprox", "server.params.proximal_mu=0.0"],
                   out=tmp_path / "prox")
    c = fedsim.run("scenarios/quickstart.toml",
                   base + ["server.strategy=fedprox", "server.params.proximal_mu=1.0"],
                   out=tmp_path / "prox1")
    sa, sb, sc = (torch.load(r.path / "model.pt", weights_only=True) for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)  # the proximal term acts


def test_bn_last_batch_of_one_does_not_crash(tmp_path):
    # 5 clients of ~287 train samples each with batch 286: a trailing batch of 1 appears
    result = fedsim.run("scenarios/quickstart.toml",
                        ["server.rounds=1", "partition.num_clients=5", "partition.kind=iid",
                         "server.clients_per_round=5", "partition.holdout_clients=0.0",
                         "model.norm=bn", "model.arch=mlp", "client.batch_size=286"],
                        out=tmp_path / "r")
    assert result.summary["final"]["global_test_accuracy"] is not None


def test_bad_input_raises_before_writing(tmp_path):
    with pytest.raises(ScenarioError, match="partition.num_clients"):
        fedsim.run("scenarios/quickstart.toml", ["partition.num_clients=100000",
                                                 "server.clients_per_round=2"],
                   out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cpu_device_override(tmp_path):
    result = fedsim.run("scenarios/quickstart.toml", TINY + ["engine.device=cpu"],
                        out=tmp_path / "cpu")
    assert result.summary["final"]["global_test_accuracy"] is not None
