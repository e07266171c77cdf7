"""SCAFFOLD, SiloBN, FixBN and central DP run end to end and do what they claim."""

import pytest
import torch

import fedsim
from fedsim.client.hooks import norm_keys, norm_statistics_keys
from fedsim.context import build_global_model
from fedsim.data.federated import build_federated_data
from fedsim.privacy.accountant import Sampling, epsilon

TINY = ["partition.num_clients=4", "server.clients_per_round=3", "partition.holdout_clients=0",
        "client.epochs=1", "model.width=8", "model.norm=bn"]


def model_pt(result):
    return torch.load(result.path / "model.pt", weights_only=True)


def initial_state(result):
    scn = fedsim.load_scenario(result.path / "scenario.toml")
    model = build_global_model(scn, build_federated_data(scn))
    return model, model.state_dict()


def test_scaffold_beats_fedavg_on_strongly_non_iid_data(tmp_path):
    # two classes per client (McMahan's shards): client drift is what SCAFFOLD corrects
    base = ["partition.kind=shards", "partition.shards_per_client=2", "partition.num_clients=8",
            "server.clients_per_round=4", "server.rounds=4", "partition.holdout_clients=0",
            "client.epochs=2", "model.norm=gn", "model.width=8", "client.lr=0.1"]
    runs = {s: fedsim.run("scenarios/quickstart.toml", base + [f"server.strategy={s}"],
                          out=tmp_path / s) for s in ("fedavg", "scaffold")}
    loss = {s: r.summary["final"]["global_test_loss"] for s, r in runs.items()}
    acc = {s: r.summary["final"]["global_test_accuracy"] for s, r in runs.items()}
    print(f"shards, seed 0, 4 rounds: loss {loss}, accuracy {acc}")
    assert loss["scaffold"] < 0.85 * loss["fedavg"], loss
    assert acc["scaffold"] > acc["fedavg"], acc


def test_silobn_shares_affine_parameters_and_keeps_statistics_local(tmp_path):
    result = fedsim.run("scenarios/quickstart.toml",
                        TINY + ["server.rounds=2", "server.strategy=silobn"], out=tmp_path / "s")
    model, init = initial_state(result)
    final = model_pt(result)
    stats = norm_statistics_keys(model)
    affine = [k for k in norm_keys(model) if k not in stats]
    assert stats and all(torch.equal(final[k], init[k]) for k in stats)  # server never saw them
    assert not all(torch.equal(final[k], init[k]) for k in affine)  # averaged like weights
    assert result.summary["final"]["personalized_accuracy"]["n"] == 4


def test_fixbn_freezes_global_statistics_after_warmup(tmp_path):
    runs = {r: fedsim.run("scenarios/quickstart.toml",
                          TINY + [f"server.rounds={r}", "server.strategy=fixbn",
                                  "server.params.warmup=1"], out=tmp_path / str(r))
            for r in (1, 3)}
    model, init = initial_state(runs[1])
    after_warmup, final = model_pt(runs[1]), model_pt(runs[3])
    stats = norm_statistics_keys(model)
    assert not all(torch.equal(after_warmup[k], init[k]) for k in stats)  # averaged in warm-up
    assert all(torch.equal(final[k], after_warmup[k]) for k in stats)  # then frozen, bitwise
    assert not torch.equal(final["head.weight"], after_warmup["head.weight"])  # training goes on


def test_dp_wraps_a_batchnorm_model_and_covers_float_parameters_only(tmp_path):
    dp = ["server.strategy=fedavg", "server.rounds=1", "server.dp.kind=fixed",
          "server.dp.clipping_norm=1.0"]
    noisy = fedsim.run("scenarios/quickstart.toml", TINY + dp + ["server.dp.noise_multiplier=0.5"],
                       out=tmp_path / "noisy")
    again = fedsim.run("scenarios/quickstart.toml", TINY + dp + ["server.dp.noise_multiplier=0.5"],
                       out=tmp_path / "again")
    clean = fedsim.run("scenarios/quickstart.toml", TINY + dp + ["server.dp.noise_multiplier=0"],
                       out=tmp_path / "clean")
    model, _ = initial_state(noisy)
    params = {n for n, _ in model.named_parameters()}
    buffers = set(model.state_dict()) - params
    report = noisy.summary["dp"]
    assert set(report["noised_arrays"]) == params and set(report["excluded_arrays"]) == buffers
    assert report["client_weights"] == "uniform" and report["noise_stddev"] == 0.5 * 1.0 / 3
    a, b, c = model_pt(noisy), model_pt(again), model_pt(clean)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the DP noise is seeded: reproducible
    assert all(torch.equal(a[k], c[k]) for k in buffers)  # statistics: never noised
    assert all(not torch.equal(a[k], c[k]) for k in params)  # every parameter: noised
    assert all(a[k].dtype == torch.int64 for k in buffers if k.endswith("num_batches_tracked"))
    # the accountant: 1 noised round, 3 of 4 clients sampled, z = 0.5, delta = 1e-5; but the
    # BN statistics left every client un-noised, so no ε is this run's
    spent = report["privacy_spent"]
    assert (spent["rounds"], spent["sampling_rate"], spent["delta"]) == (1, 0.75, 1e-5)
    assert spent["rdp"] == pytest.approx(epsilon(0.5, Sampling.fixed_size(3, 4), 1, 1e-5).rdp)
    assert spent["epsilon"] is None and "running_mean" in spent["why_not"]
    assert clean.summary["dp"]["privacy_spent"]["epsilon"] is None  # no noise, no bound


def test_adaptive_dp_around_fedbn_leaves_local_layers_out(tmp_path):
    result = fedsim.run("scenarios/quickstart.toml",
                        TINY + ["server.strategy=fedbn", "server.rounds=2",
                                "server.dp.kind=adaptive", "server.dp.noise_multiplier=0.1",
                                "server.dp.clipped_count_stddev=1.0"], out=tmp_path / "r")
    model, _ = initial_state(result)
    report = result.summary["dp"]
    assert report["kind"] == "adaptive" and report["excluded_arrays"] == []
    assert set(report["local_arrays"]) == set(norm_keys(model))
    assert not set(report["noised_arrays"]) & set(norm_keys(model))
    assert result.summary["final"]["personalized_accuracy"]["n"] == 4  # found through the wrapper
    spent = report["privacy_spent"]  # both rounds, at the requested (total) multiplier
    assert (spent["rounds"], spent["noise_multiplier"]) == (2, 0.1)
    assert spent["epsilon"] == pytest.approx(epsilon(0.1, Sampling.fixed_size(3, 4), 2,
                                                     1e-5).value)
