"""[server.dp]: ε only where the DP-FedAvg analysis holds, max_epsilon, target_epsilon."""

import json

import pytest
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, Krum

import fedsim
import fedsim.plugins  # noqa: F401  fedsim's own strategies register (fedbn, scaffold, ...)
from fedsim.cli import main
from fedsim.config import load_scenario
from fedsim.errors import ScenarioError
from fedsim.privacy.accountant import Sampling, epsilon
from fedsim.server.dp import calibration, start_lines
from fedsim.server.dp_analysis import why_not
from fedsim.server.factory import make_strategy
from fedsim.server.strategies import strategy_class

QUICK = "scenarios/quickstart.toml"
# 4 clients, 2 a round: sampling rate 0.5
TINY = ["server.rounds=5", "partition.num_clients=4", "server.clients_per_round=2",
        "partition.holdout_clients=0.0", "client.epochs=1", "model.width=8",
        "server.dp.kind=fixed"]


def scenario(*overrides):
    return load_scenario(QUICK, [*TINY, *overrides])


@pytest.mark.parametrize("cls,words", [
    (FedAdam, "adaptive server optimizer"),
    (FedAvgM, "momentum"),
    (FedMedian, "robust aggregate"),
    (Krum, "robust aggregate"),
])
def test_no_epsilon_where_the_analysis_does_not_hold(cls, words):
    assert words in why_not(cls)
    name = {FedAdam: "fedadam", FedAvgM: "fedavgm", FedMedian: "fedmedian", Krum: "krum"}[cls]
    wrapped = make_strategy(scenario(f"server.strategy={name}"))
    spent = wrapped.privacy_spent()
    assert spent["epsilon"] is None and words in spent["why_not"]
    assert spent["rdp"] == 0.0  # the accountant's numbers stay, for reference
    lines = start_lines(scenario(f"server.strategy={name}"))
    assert len(lines) == 1 and lines[0].startswith("warning: server.dp: ") and words in lines[0]


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedbn", "silobn"])
def test_epsilon_where_the_output_is_the_clipped_mean(name):
    assert why_not(strategy_class(name)) is None
    assert start_lines(scenario(f"server.strategy={name}")) == []
    assert make_strategy(scenario(f"server.strategy={name}")).privacy_spent()["epsilon"] == 0.0


@pytest.mark.parametrize("name,words", [("scaffold", "control-variate deltas Δc without"),
                                        ("fixbn", "BN statistics")])
def test_our_strategies_that_leak_across_clients_get_no_epsilon(name, words):
    assert words in why_not(strategy_class(name))


def test_subclasses_unknown_unless_they_inherit_a_reason():
    class Mine(FedAvg):
        pass

    class MyAdam(FedAdam):
        pass

    assert "has not checked" in why_not(Mine)
    assert why_not(MyAdam).startswith("MyAdam is a FedAdam: its adaptive")
    assert why_not(FedProx) is None


def test_max_epsilon_stops_cleanly_before_the_round_that_would_exceed_it(tmp_path, capsys):
    # fixed-size cohorts of 2 of 4 clients: sampling without replacement, replace-one
    eps = [epsilon(1.0, Sampling.fixed_size(2, 4), r, 1e-5).value for r in range(1, 6)]
    limit = (eps[1] + eps[2]) / 2  # rounds 1-2 fit, round 3 would exceed
    out = tmp_path / "r"
    args = ["run", QUICK, "--out", str(out), "--quiet"]
    for o in [*TINY, "server.dp.noise_multiplier=1.0", f"server.dp.max_epsilon={limit}"]:
        args += ["--set", o]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    stopped = f"round 3 would spend ε = {eps[2]:.3g} > server.dp.max_epsilon = {limit:g}"
    assert summary["dp"]["stopped"] == stopped
    assert summary["stopped"] == {"round": 3, "reason": stopped, "kind": "privacy_budget",
                                  "planned": True}
    assert summary["dp"]["privacy_spent"]["rounds"] == 2
    assert summary["dp"]["privacy_spent"]["epsilon"] == pytest.approx(eps[1])
    rounds = [json.loads(line)["round"] for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2] and (out / "model.pt").is_file()
    assert f"DP: the run stopped cleanly: {stopped}" in capsys.readouterr().out


def test_target_epsilon_calibrates_the_noise(tmp_path):
    scn = scenario("server.rounds=2", "server.dp.target_epsilon=4")
    cal = calibration(scn)
    fixed = Sampling.fixed_size(2, 4)
    assert epsilon(cal["noise_multiplier"], fixed, 2, 1e-5).value == pytest.approx(4, rel=1e-3)
    assert start_lines(scn)[0].startswith(
        f"DP: noise_multiplier = {cal['noise_multiplier']:.4g}, calibrated for ε = 4 ")
    result = fedsim.run(scn, out=tmp_path / "r")
    dp = result.summary["dp"]
    assert dp["noise_multiplier"] == cal["noise_multiplier"]
    assert dp["calibrated_for"] == {"target_epsilon": 4.0, "rounds": 2, "delta": 1e-5,
                                    "sampling": "fixed_size", "sampling_rate": 0.5,
                                    "relation": "replace_one"}
    spent = dp["privacy_spent"]  # the valid analysis of the cohort that ran
    assert (spent["sampling"], spent["relation"], spent["unit"]) == (
        "fixed_size", "replace_one", "client")
    assert 4 * (1 - 1e-3) <= spent["epsilon"] <= 4
    # the Poisson analysis of the same σ would have claimed far less: the calibration that
    # assumed it gave too little noise
    assert epsilon(cal["noise_multiplier"], 0.5, 2, 1e-5).value < 4


@pytest.mark.parametrize("overrides,match", [
    (["server.dp.target_epsilon=3", "server.dp.noise_multiplier=2"],
     "server.dp.target_epsilon = 3.0 .* server.dp.noise_multiplier = 2.0"),
    # the default value, given explicitly, is given: σ beside a target is ambiguous
    (["server.dp.target_epsilon=3", "server.dp.noise_multiplier=1.0"],
     "server.dp.target_epsilon = 3.0 .* server.dp.noise_multiplier = 1.0 cannot be set too"),
    (["server.dp.sampling=uniform"], "server.dp.sampling = 'uniform' is out of range; use "
                                     "one of fixed_size, poisson"),
    (["server.dp.on_fewer_replies=ignore"], "server.dp.on_fewer_replies"),
    (["server.dp.sampling=poisson", "failures.min_replies=2"],
     "failures.min_replies = 2 cannot hold with server.dp.sampling = 'poisson'"),
    (["server.dp.max_epsilon=-1"], "server.dp.max_epsilon = -1.0 is out of range"),
    (["server.dp.target_epsilon=-1"], "server.dp.target_epsilon"),
])
def test_bad_budgets_are_refused(overrides, match):
    with pytest.raises(ScenarioError, match=match):
        scenario(*overrides)
