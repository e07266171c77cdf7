"""Andrew et al.'s one-shot estimate: the ε of two Gaussians against dp-accounting and a
numerical integral, and on Gaussian mechanisms simulated in numpy (canary directions in d
dimensions): close to the known ε for one release, below the accountant's for DP-FedAvg's
final model, large without noise."""

import math

import dp_accounting
import numpy as np
import pytest
from scipy.integrate import quad
from scipy.stats import norm

from fedsim.canaries import unit_direction, unit_directions
from fedsim.privacy.accountant import epsilon
from fedsim.privacy.canary import cosines, epsilon_of_gaussians, gaussian_estimate
from fedsim.privacy.one_run import one_run_audit


@pytest.mark.parametrize("mu", [0.25, 1.0, 3.0])
def test_equal_variances_are_the_gaussian_mechanism(mu):
    """N(0, 1) against N(μ, 1) is the Gaussian mechanism with noise 1/μ of the sensitivity."""
    ours = epsilon_of_gaussians(0.0, 1.0, mu, 1.0, 1e-5)
    assert ours == pytest.approx(dp_accounting.get_epsilon_gaussian(1 / mu, 1e-5), rel=1e-8)
    assert epsilon_of_gaussians(5.0, 2.0, 5.0 + 2 * mu, 2.0, 1e-5) == pytest.approx(ours,
                                                                                     rel=1e-8)


def test_unequal_variances_against_a_numerical_integral():
    """δ(ε) = max over the two orders of ∫ max(0, p − e^ε q): at the ε returned it is δ."""
    p, q, delta = (1.0, 1.3), (0.0, 1.0), 1e-3
    eps = epsilon_of_gaussians(*q, *p, delta)

    def hockey_stick(a, b):
        f = lambda y: max(0.0, norm.pdf(y, *a) - math.exp(eps) * norm.pdf(y, *b))  # noqa: E731
        return sum(quad(f, lo, hi, limit=200)[0] for lo, hi in ((-40, 0), (0, 40)))

    assert max(hockey_stick(p, q), hockey_stick(q, p)) == pytest.approx(delta, rel=1e-4)


def test_cosines_and_directions():
    assert cosines(np.array([3.0, 4.0]), np.array([[1.0, 0.0], [0.0, 1.0]])).tolist() == \
        pytest.approx([0.6, 0.8])
    assert cosines(np.zeros(2), np.eye(2)).tolist() == [0.0, 0.0]
    d = unit_directions(500, 0, "client-canary", [3, 7])
    assert np.allclose(np.linalg.norm(d, axis=1), 1, atol=1e-6)
    assert np.array_equal(d[1], unit_direction(500, 0, "client-canary", 7))  # derived


def fedavg_run(seed, sigma, dim=2000, count=400, rounds=20, rate=0.2, final_only=True):
    """DP-FedAvg's mechanism on canaries alone: each round every in canary joins with
    probability ``rate`` and adds its unit direction to the sum, plus N(0, σ²) noise per
    coordinate; returns the canaries' statistics and bits."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((count, dim))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bits = rng.random(count) < 0.5
    total, best = np.zeros(dim), np.full(count, -np.inf)
    for _ in range(rounds):
        step = dirs[bits & (rng.random(count) < rate)].sum(0) + rng.normal(0, sigma, dim)
        total += step
        best = np.maximum(best, cosines(step, dirs))
    return (cosines(total, dirs) if final_only else best), bits


def test_one_release_estimates_the_gaussian_mechanisms_epsilon():
    """One release (q = 1): the estimate is near the true ε — an estimate, so on either side."""
    true = dp_accounting.get_epsilon_gaussian(1.0, 1e-5)  # 4.38
    found = []
    for seed in range(8):
        stat, bits = fedavg_run(seed, 1.0, dim=5000, count=1000, rounds=1, rate=1.0)
        found.append(gaussian_estimate(stat[bits], 0.0, 5000 ** -0.5, 1e-5)["epsilon_estimate"])
    assert abs(np.median(found) - true) < 0.25 * true, found
    assert max(found) > true * 0.95  # not a lower bound: draws reach the truth and beyond


def test_dp_fedavg_final_model_estimates_stay_below_the_accountant():
    sigma = 1.0
    accountant = epsilon(sigma, 0.2, 20, 1e-5).value  # 6.6: every iterate released
    found = []
    for seed in range(6):
        stat, bits = fedavg_run(seed, sigma, dim=5000, count=1000)
        found.append(gaussian_estimate(stat[bits], 0.0, 5000 ** -0.5, 1e-5)["epsilon_estimate"])
        lower = one_run_audit(stat, bits, 1e-5)["epsilon_lower_bound"]
        assert 0 < lower <= found[-1]  # the bound sits below the estimate
    assert max(found) < accountant, found


def test_without_noise_estimate_and_bound_are_large():
    stat, bits = fedavg_run(0, 1e-6, count=400)
    assert gaussian_estimate(stat[bits], 0.0, 2000 ** -0.5, 1e-5)["epsilon_estimate"] > 20
    assert one_run_audit(stat, bits, 1e-5)["epsilon_lower_bound"] > 2.5  # 400 canaries' most


def test_degenerate_canaries_give_no_estimate():
    assert gaussian_estimate(np.array([0.1]), 0, 0.1, 1e-5)["epsilon_estimate"] is None
    assert "do not vary" in gaussian_estimate(np.ones(3), 0, 0.1, 1e-5)["why_null"]
