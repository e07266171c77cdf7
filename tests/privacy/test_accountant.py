"""The DP accountant against Google's dp_accounting and the Gaussian mechanism's closed form."""

import math

import numpy as np
import pytest

from fedsim.privacy.accountant import (
    ORDERS,
    epsilon_from_rdp,
    privacy_spent,
    rdp_sampled_gaussian,
)

#: (q, noise multiplier, rounds, delta) -> (epsilon, order) from dp_accounting 0.6.0:
#: RdpAccountant(orders=range(2, 257)).compose(PoissonSampledDpEvent(q,
#: GaussianDpEvent(z)), rounds).get_epsilon_and_optimal_order(delta)
REFERENCE = [
    ((0.01, 1.1, 1000, 1e-5), (1.7252908180449444, 9)),
    ((256 / 60000, 1.1, 60 * 60000 // 256, 1e-5), (2.5969811785948815, 8)),  # Abadi et al.
    ((0.1, 1.0, 100, 1e-5), (7.972921510380539, 3)),
    ((1.0, 5.0, 10, 1e-5), (2.814109167845533, 8)),
    ((0.5, 0.8, 20, 1e-3), (18.802864106293722, 2)),
    ((10 / 18, 1.0, 10, 1e-5), (12.828505789127961, 3)),  # quickstart's sampling
    ((100 / 9900, 1.0, 20, 1e-5), (1.084178923433859, 9)),  # thousand_clients' sampling
]


@pytest.mark.parametrize("args,expected", REFERENCE)
def test_epsilon_equals_googles_dp_accounting(args, expected):
    spent = privacy_spent(*args)
    assert spent.epsilon == pytest.approx(expected[0], rel=1e-9)
    assert spent.order == expected[1]


def test_full_participation_is_the_gaussian_mechanism():
    """q = 1: Rényi DP of the Gaussian mechanism, alpha / (2 sigma^2) (Mironov 2017)."""
    z = 1.7
    np.testing.assert_allclose(rdp_sampled_gaussian(1.0, z),
                               np.array(ORDERS) / (2 * z * z), rtol=1e-12)
    # and the binomial sum approaches it as q -> 1
    np.testing.assert_allclose(rdp_sampled_gaussian(1 - 1e-9, z, orders=(2, 3, 10)),
                               np.array([2, 3, 10]) / (2 * z * z), rtol=1e-6)


def test_second_order_closed_form():
    """alpha = 2: log(1 - q + q exp(1/sigma^2) ... ) = log(1 + q^2 (e^{1/s^2} - 1))."""
    q, z = 0.3, 1.2
    expected = math.log(1 + q * q * (math.exp(1 / z**2) - 1))
    assert rdp_sampled_gaussian(q, z, orders=(2,))[0] == pytest.approx(expected, rel=1e-12)


def test_epsilon_grows_with_rounds_and_sampling_and_shrinks_with_noise():
    base = privacy_spent(0.05, 1.0, 50, 1e-5).epsilon
    assert privacy_spent(0.05, 1.0, 100, 1e-5).epsilon > base
    assert privacy_spent(0.10, 1.0, 50, 1e-5).epsilon > base
    assert privacy_spent(0.05, 2.0, 50, 1e-5).epsilon < base
    assert privacy_spent(0.05, 1.0, 50, 1e-3).epsilon < base  # a looser delta


def test_nothing_released_spends_nothing_and_no_noise_has_no_bound():
    assert privacy_spent(0.1, 1.0, 0, 1e-5).epsilon == 0.0
    assert privacy_spent(0.1, 1.0, 0, 1e-5).order is None
    assert privacy_spent(0.0, 1.0, 10, 1e-5).epsilon == 0.0  # nobody is ever sampled
    assert math.isinf(privacy_spent(0.1, 0.0, 1, 1e-5).epsilon)


@pytest.mark.parametrize("call,match", [
    (lambda: privacy_spent(1.5, 1.0, 1, 1e-5), "sampling rate"),
    (lambda: privacy_spent(0.1, -1.0, 1, 1e-5), "noise_multiplier"),
    (lambda: privacy_spent(0.1, 1.0, -1, 1e-5), "rounds"),
    (lambda: privacy_spent(0.1, 1.0, 1, 0.0), "delta"),
    (lambda: privacy_spent(0.1, 1.0, 0, 1.0), "delta"),
    (lambda: rdp_sampled_gaussian(0.1, 1.0, orders=(1.5,)), "integers"),
    (lambda: epsilon_from_rdp(np.zeros(len(ORDERS)), 2.0), "delta"),
])
def test_bad_arguments_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()
