"""[server.dp]'s mechanism: the sampling that runs, the noise for the denominator used, what
leaves un-noised, and adaptive clipping (Andrew et al. 2021) — unit and end to end."""

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg

import fedsim
import fedsim.plugins  # noqa: F401  fedsim's strategies register (fedbn, silobn, ...)
from fedsim import compat
from fedsim.config import load_scenario
from fedsim.engine.inprocess import set_task_identity
from fedsim.privacy.accountant import Sampling, epsilon
from fedsim.server.dp import (
    ParameterDPAdaptiveClipping,
    ParameterDPFixedClipping,
    geometric_update,
    poisson_sample,
    start_lines,
)

QUICK = "scenarios/quickstart.toml"
TINY = ["server.rounds=4", "partition.num_clients=6", "server.clients_per_round=2",
        "partition.holdout_clients=0.0", "client.epochs=1", "model.width=8",
        "server.dp.kind=fixed"]


def run(tmp_path, *overrides):
    result = fedsim.run(QUICK, [*TINY, *overrides], out=tmp_path / "r")
    rounds = [json.loads(line) for line in (result.path / "rounds.jsonl").read_text().splitlines()]
    return result.summary["dp"], rounds[1:]


def reply(update: np.ndarray, node: int, base: np.ndarray) -> Message:
    """A client's train reply uploading ``base + update`` as its one parameter ``w``."""
    set_task_identity(1)
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    compat.set_message_id(instruction, f"m{node}")
    content = RecordDict({"arrays": ArrayRecord({"w": Array(base + update)}),
                          "metrics": MetricRecord({"num-examples": 7 * node})})
    return Message(content, reply_to=instruction)


def aggregate(wrapper, base: np.ndarray, updates: list[np.ndarray], rnd: int = 1):
    wrapper._global = wrapper.current_arrays = ArrayRecord({"w": Array(base)})
    return wrapper.aggregate_train(rnd, [reply(u, i + 1, base) for i, u in enumerate(updates)])


# --------------------------------------------------------------------------- sampling


def test_poisson_sample_draws_each_node_independently_at_the_rate():
    nodes = list(range(400))
    sizes = [len(poisson_sample(nodes, 0.1, 0, r)) for r in range(1, 201)]
    assert abs(np.mean(sizes) - 40) < 1.5  # E = 40, sd of the mean over 200 rounds ≈ 0.42
    assert np.std(sizes) == pytest.approx(math.sqrt(400 * 0.1 * 0.9), rel=0.2)
    assert poisson_sample(nodes, 0.1, 0, 3) == poisson_sample(nodes, 0.1, 0, 3)  # derived
    assert poisson_sample(nodes, 0.1, 0, 3) != poisson_sample(nodes, 0.1, 1, 3)


def test_poisson_divides_by_the_fixed_expected_cohort_and_noises_once():
    """McMahan et al. 2018, Alg. 1: Σ clipped updates / (qN), here m = 4, whatever replies
    arrive; without noise the result is exact."""
    base = np.array([1.0, -2.0])
    wrapper = ParameterDPFixedClipping(FedAvg(), 0.0, 1.0, 4, ["w"], seed=0, population=8,
                                       sampling="poisson")
    ups = [np.array([0.6, 0.8]), np.array([3.0, 4.0])]  # norms 1 and 5 (clipped to 1)
    got, _ = aggregate(wrapper, base, ups)
    np.testing.assert_allclose(got["w"].numpy(), base + (ups[0] + ups[1] / 5) / 4, rtol=1e-12)
    assert wrapper.noised_rounds == 1 and wrapper.noise_stddev == 0.0
    empty, metrics = aggregate(wrapper, base, [], rnd=2)  # nobody sampled: released anyway
    assert metrics is None and np.array_equal(empty["w"].numpy(), base)
    assert wrapper.noised_rounds == 2 and wrapper.releases_every_round


@pytest.mark.parametrize("sampling", ["poisson", "fixed_size"])
def test_noise_std_is_sigma_c_over_the_denominator_used(sampling):
    base = np.zeros(20_000)
    wrapper = ParameterDPFixedClipping(FedAvg(), 2.0, 0.5, 4, ["w"], seed=3, population=8,
                                       sampling=sampling)
    got, _ = aggregate(wrapper, base, [np.zeros(20_000)] * 4)  # zero updates: noise alone
    assert wrapper.noise_stddev == 2.0 * 0.5 / 4
    assert np.std(got["w"].numpy()) == pytest.approx(0.25, rel=0.03)
    again, _ = aggregate(ParameterDPFixedClipping(FedAvg(), 2.0, 0.5, 4, ["w"], seed=3,
                                                  population=8, sampling=sampling),
                         base, [np.zeros(20_000)] * 4)
    assert np.array_equal(got["w"].numpy(), again["w"].numpy())  # seeded (seed, round)


def test_poisson_runs_end_to_end_releasing_every_round(tmp_path):
    """q = 1/6: some rounds sample nobody; each is still released (the noise alone) and
    counted, and the Poisson PLD ε is reported under add/remove adjacency."""
    dp, rounds = run(tmp_path, "server.clients_per_round=1", "server.dp.sampling=poisson",
                     "server.rounds=6")
    sizes = [len(r["clients"]) for r in rounds]
    assert 0 in sizes and max(sizes) >= 2, sizes  # variable cohorts, an empty one included
    spent = dp["privacy_spent"]
    assert (spent["sampling"], spent["relation"], spent["rounds"]) == (
        "poisson", "add_or_remove_one", 6)
    assert spent["epsilon"] == pytest.approx(epsilon(1.0, 1 / 6, 6, 1e-5).pld)
    assert dp["fewer_replies"]["policy"] is None


def test_poisson_cohorts_are_the_same_sequentially_and_in_vmap_cohorts(tmp_path):
    sets = ["server.dp.sampling=poisson", "server.rounds=3", "server.dp.noise_multiplier=0.5"]
    runs = [fedsim.run(QUICK, [*TINY, *sets, *engine], out=tmp_path / str(i))
            for i, engine in enumerate([[], ["engine.vectorize=true"]])]
    clients = [[json.loads(line).get("clients") for line in
                (r.path / "rounds.jsonl").read_text().splitlines()] for r in runs]
    assert clients[0] == clients[1]
    eps = [r.summary["dp"]["privacy_spent"]["epsilon"] for r in runs]
    assert eps[0] == eps[1] == pytest.approx(epsilon(0.5, 2 / 6, 3, 1e-5).pld)


def test_poisson_is_refused_where_its_analysis_cannot_hold():
    with pytest.raises(fedsim.ScenarioError, match="server.dp.sampling = .poisson. runs only"):
        fedsim.run(QUICK, [*TINY, "server.dp.sampling=poisson", "server.strategy=scaffold"])


# --------------------------------------------------------------------------- fewer replies


@pytest.mark.parametrize("policy", ["scale_noise", "refuse", "void"])
def test_dropped_replies_never_leave_epsilon_unchanged_with_weaker_noise(tmp_path, policy):
    """With simulated dropouts, every fixed-size round that averaged m' < m replies either had
    its noise scaled to m' (the sum's noise stays σC, ε unchanged), was not released (ε counts
    fewer rounds), or voided ε."""
    dp, rounds = run(tmp_path, "failures.dropout=0.4", "server.clients_per_round=3",
                     f"server.dp.on_fewer_replies={policy}", "server.dp.noise_multiplier=2.0")
    short = [r["round"] for r in rounds if 0 < len(r["clients"]) < 3]
    assert short, "the fixture must drop some replies"
    report, spent = dp["fewer_replies"], dp["privacy_spent"]
    assert report["policy"] == policy and [r["round"] for r in report["by_round"]] == short
    full = epsilon(2.0, Sampling.fixed_size(3, 6), 4, 1e-5).value
    if policy == "scale_noise":
        assert spent["epsilon"] == pytest.approx(full) and spent["rounds"] == 4
        assert all(r["noise_stddev"] == pytest.approx(2.0 * 1.0 / r["replies"])
                   for r in report["by_round"])
    elif policy == "refuse":
        assert spent["rounds"] == 4 - len(short) and spent["epsilon"] < full
        assert all(r["noise_stddev"] is None for r in report["by_round"])
    else:
        assert spent["epsilon"] is None and "on_fewer_replies = 'void'" in spent["why_not"]
        assert all(r["noise_stddev"] == pytest.approx(2.0 / 3) for r in report["by_round"])


def test_refused_round_leaves_the_global_model_as_it_was():
    base = np.array([1.0, 2.0])
    wrapper = ParameterDPFixedClipping(FedAvg(), 1.0, 1.0, 3, ["w"], seed=0, population=6,
                                       on_fewer_replies="refuse")
    assert aggregate(wrapper, base, [np.ones(2)] * 2) == (None, None)
    assert wrapper.noised_rounds == 0 and wrapper.fewer_replies[0]["replies"] == 2


# --------------------------------------------------------------------------- un-noised arrays


def test_bn_statistics_sent_without_noise_void_epsilon_with_why(tmp_path):
    scn = load_scenario(QUICK, [*TINY, "model.norm=bn"])
    assert "running statistics" in start_lines(scn)[0]
    dp, _ = run(tmp_path, "model.norm=bn")
    spent = dp["privacy_spent"]
    assert spent["epsilon"] is None and spent["rdp"] > 0  # the accountant's number stays
    assert "features.1.running_mean" in spent["why_not"] and "without clipping or noise" in \
        spent["why_not"]
    assert "features.1.running_var" in dp["excluded_arrays"]


@pytest.mark.parametrize("strategy", ["fedbn", "silobn"])
def test_bn_statistics_kept_on_the_clients_leave_epsilon_finite(tmp_path, strategy):
    assert start_lines(load_scenario(QUICK, [*TINY, "model.norm=bn",
                                             f"server.strategy={strategy}"])) == []
    dp, _ = run(tmp_path, "model.norm=bn", f"server.strategy={strategy}")
    spent = dp["privacy_spent"]
    assert dp["excluded_arrays"] == [] and "features.1.running_var" in dp["local_arrays"]
    assert spent["why_not"] is None
    assert spent["epsilon"] == pytest.approx(epsilon(1.0, Sampling.fixed_size(2, 6), 4,
                                                     1e-5).value)


# --------------------------------------------------------------------------- adaptive clipping


NORMS = np.linspace(0.5, 1.5, 10)  # known update norms; their empirical quantiles are exact


def uniform_norms(rounds: int):
    """Each round, 10 update norms uniform in [0.5, 1.5] (median 1), fixed by a seed."""
    rng = np.random.default_rng(0)
    return [rng.uniform(0.5, 1.5, 10) for _ in range(rounds)]


def flower_runaway(c0: float, rounds: int = 60) -> float:
    """Flower 1.42's adaptive clipping (no count noise) on uniform_norms."""
    dp = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), 0.0, 10, c0, 0.5, 0.2, 0.0)
    for norms in uniform_norms(rounds):
        dp._geometric_update(float(np.mean(norms > dp.clipping_norm)))  # noqa: SLF001
    return dp.clipping_norm


def ours(c0: float, rounds: int = 60) -> float:
    c = c0
    for norms in uniform_norms(rounds):
        c = geometric_update(c, float(np.mean(norms <= c)), 0.5, 0.2)
    return c


def test_flowers_update_by_the_clipped_fraction_runs_away_and_ours_does_not():
    """The issue's numbers: from C0 = 1 Flower's norm falls to ~0.003 in 60 rounds, from
    C0 = 3 it climbs by e^0.1 a round to 3·e^6 = 1,210; ours ends near the median, 1."""
    assert flower_runaway(1.0) < 0.01
    assert flower_runaway(3.0) == pytest.approx(3 * math.exp(6), rel=1e-9)
    assert 0.8 < ours(1.0) < 1.2 and 0.8 < ours(3.0) < 1.2 and 0.8 < ours(0.01) < 1.2


@pytest.mark.parametrize("c0", [0.05, 1.0, 20.0])  # from below, inside and above
@pytest.mark.parametrize("clipped_quantile,expected", [(0.5, (0.944, 1.056)),
                                                       (0.2, (1.278, 1.389))])
def test_the_unclipped_fraction_update_settles_at_the_target_quantile(c0, clipped_quantile,
                                                                      expected):
    """γ = 1 − target_clipped_quantile of the norms lie at or below C once it settles: 0.5 →
    between the 5th and 6th of the 10 norms, 0.2 clipped → between the 8th and 9th."""
    c = c0
    for _ in range(200):
        c = geometric_update(c, float(np.mean(c >= NORMS)), 1 - clipped_quantile, 0.2)
    tail = []
    for _ in range(50):
        c = geometric_update(c, float(np.mean(c >= NORMS)), 1 - clipped_quantile, 0.2)
        tail.append(c)
    lo, hi = expected
    assert lo * 0.9 <= min(tail) and max(tail) <= hi * 1.1, (min(tail), max(tail))


def test_the_wrapper_adapts_by_the_unclipped_count_and_noises_with_the_norm_it_clipped_to():
    base = np.zeros(3)
    dirs = np.eye(3)[np.arange(10) % 3]
    wrapper = ParameterDPAdaptiveClipping(FedAvg(), 0.0, 10, 3.0, 0.5, 0.2, 0.0, ["w"],
                                          seed=0, population=10)
    for rnd in range(1, 121):
        aggregate(wrapper, base, [n * d for n, d in zip(NORMS, dirs, strict=True)], rnd)
    assert 0.9 < wrapper.clipping_norm < 1.1  # the median of NORMS is 1.0
    assert wrapper.unclipped_fraction == 0.5
