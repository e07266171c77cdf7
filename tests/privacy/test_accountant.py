"""The DP accountant against Google's dp_accounting called directly, and its calibration."""

import itertools
import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fedsim.privacy.accountant import (
    PLD_DISCRETIZATION,
    SAMPLING_ASSUMPTION,
    Sampling,
    epsilon,
    epsilon_by,
    noise_for_epsilon,
)

GRID = list(itertools.product((0.5, 1.0, 2.0), (0.01, 0.1, 1.0), (1, 50), (1e-5, 1e-6)))


def direct(accountant, sigma, q, rounds, delta):
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    return accountant.compose(event, rounds).get_epsilon(delta)


@pytest.mark.parametrize("sigma,q,rounds,delta", GRID)
def test_epsilon_equals_dp_accounting_called_directly(sigma, q, rounds, delta):
    eps = epsilon(sigma, q, rounds, delta)
    assert eps.rdp == pytest.approx(direct(RdpAccountant(), sigma, q, rounds, delta), rel=1e-12)
    pld = PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    assert eps.pld == pytest.approx(direct(pld, sigma, q, rounds, delta), rel=1e-12)
    assert eps.value == eps.pld <= eps.rdp * (1 + 1e-9)  # PLD is the tighter bound


def test_the_known_case_and_the_pld_discretization():
    """σ = 0.5, q = 0.1, 50 rounds, δ = 1e-5: RDP 25.88, PLD 22.62 (the old integer-order
    RDP accountant said 31.59). fedsim's coarser PLD grid agrees with dp_accounting's default."""
    eps = epsilon(0.5, 0.1, 50, 1e-5)
    assert eps.rdp == pytest.approx(25.884, abs=1e-3)
    assert eps.pld == pytest.approx(22.623, abs=1e-3)
    default = direct(PLDAccountant(), 0.5, 0.1, 50, 1e-5)
    assert eps.pld == pytest.approx(default, rel=1e-5) and eps.pld >= default


def test_edge_cases_and_the_record():
    nothing = epsilon(1.0, 0.1, 0, 1e-5)  # nothing released
    assert (nothing.rdp, nothing.pld, nothing.steps, nothing.sampling) == (
        0.0, 0.0, 0, Sampling.poisson(0.1))
    assert epsilon(0.0, 0.1, 0, 1e-5).value == 0.0
    assert epsilon(1.0, 0.0, 10, 1e-5).value == 0.0  # nobody is ever sampled
    no_noise = epsilon(0.0, 0.1, 1, 1e-5)
    assert math.isinf(no_noise.rdp) and math.isinf(no_noise.pld)
    record = epsilon(1.0, 0.1, 5, 1e-5).as_dict()
    assert record["epsilon"] == record["pld"] and record["reported"] == "pld"
    assert record["assumes"] == SAMPLING_ASSUMPTION and "Poisson" in SAMPLING_ASSUMPTION
    assert (record["sampling"], record["relation"]) == ("poisson", "add_or_remove_one")


def test_epsilon_grows_with_rounds_and_sampling_and_shrinks_with_noise():
    base = epsilon(1.0, 0.05, 50, 1e-5).value
    assert epsilon(1.0, 0.05, 100, 1e-5).value > base
    assert epsilon(1.0, 0.10, 50, 1e-5).value > base
    assert epsilon(2.0, 0.05, 50, 1e-5).value < base
    assert epsilon(1.0, 0.05, 50, 1e-3).value < base  # a looser delta


@pytest.mark.parametrize("method", ["pld", "rdp"])
@pytest.mark.parametrize("target,q,rounds", [(1.0, 0.1, 50), (8.0, 1.0, 10), (3.0, 0.5, 1)])
def test_calibration_round_trips(method, target, q, rounds):
    sigma = noise_for_epsilon(target, q, rounds, 1e-5, method)
    got = epsilon_by(method, sigma, q, rounds, 1e-5)
    assert got <= target  # never less private than asked
    assert got == pytest.approx(target, rel=1e-3)
    assert epsilon_by(method, sigma * (1 - 1e-3), q, rounds, 1e-5) > target  # and the least σ


def test_calibration_with_nothing_released_needs_no_noise():
    assert noise_for_epsilon(1.0, 0.1, 0, 1e-5) == 0.0


@pytest.mark.parametrize("call,match", [
    (lambda: epsilon(1.0, 1.5, 1, 1e-5), "sampling rate"),
    (lambda: epsilon(-1.0, 0.1, 1, 1e-5), "noise_multiplier"),
    (lambda: epsilon(1.0, 0.1, -1, 1e-5), "steps"),
    (lambda: epsilon(1.0, 0.1, 1, 0.0), "delta"),
    (lambda: epsilon(1.0, 0.1, 0, 1.0), "delta"),
    (lambda: epsilon_by("gdp", 1.0, 0.1, 1, 1e-5), "accountant"),
    (lambda: noise_for_epsilon(0.0, 0.1, 1, 1e-5), "target epsilon"),
    (lambda: noise_for_epsilon(1.0, 0.1, 1, 1e-5, "gdp"), "accountant"),
])
def test_bad_arguments_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- fixed-size cohorts


def test_the_issue_example_with_dp_accounting_called_directly():
    """N = 100, m = 10, σ = 1, 100 rounds, δ = 1e-5: Poisson PLD 7.05; a fixed-size cohort
    without replacement under replace-one (sensitivity 2C, so noise multiplier σ/2) 83.9."""
    poisson = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 100)
    assert PLDAccountant().compose(poisson).get_epsilon(1e-5) == pytest.approx(7.05, abs=0.01)
    fixed = dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
        100, 10, dp_accounting.GaussianDpEvent(0.5)), 100)
    replace_one = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    direct_fixed = replace_one.compose(fixed).get_epsilon(1e-5)
    assert direct_fixed == pytest.approx(83.9, abs=0.05)
    ours = epsilon(1.0, Sampling.fixed_size(10, 100), 100, 1e-5)
    assert ours.value == ours.rdp == pytest.approx(direct_fixed, rel=1e-12)
    assert ours.pld is None  # dp_accounting's PLD does not support the event
    assert ours.as_dict()["relation"] == "replace_one"
    assert epsilon(1.0, 0.1, 100, 1e-5).value == pytest.approx(7.05, abs=0.01)


@pytest.mark.parametrize("sigma,m,rounds", [(0.8, 5, 10), (1.0, 10, 50), (2.0, 20, 100),
                                            (1.0, 100, 5)])
def test_a_fixed_size_cohort_never_gets_less_epsilon_than_poisson(sigma, m, rounds):
    poisson = epsilon(sigma, m / 100, rounds, 1e-5).value
    fixed = epsilon(sigma, Sampling.fixed_size(m, 100), rounds, 1e-5).value
    assert fixed >= poisson, (fixed, poisson)


def test_fixed_size_calibration_round_trips():
    fixed = Sampling.fixed_size(10, 100)
    sigma = noise_for_epsilon(8.0, fixed, 20, 1e-5)
    assert epsilon_by("rdp", sigma, fixed, 20, 1e-5) <= 8.0
    assert epsilon_by("rdp", sigma * (1 - 1e-3), fixed, 20, 1e-5) > 8.0
    assert sigma > noise_for_epsilon(8.0, 0.1, 20, 1e-5)  # Poisson would add too little


def test_fixed_size_has_no_pld_accountant():
    with pytest.raises(ValueError, match="does not support fixed_size"):
        epsilon_by("pld", 1.0, Sampling.fixed_size(10, 100), 5, 1e-5)
    with pytest.raises(ValueError, match="impossible"):
        Sampling.fixed_size(11, 10)
