"""An (ε, δ) for central DP-FedAvg: Rényi DP of the subsampled Gaussian mechanism.

Each DP round releases the aggregate of the sampled clients' clipped updates plus Gaussian
noise of ``noise_multiplier`` times the clipping norm (on the sum): a Gaussian mechanism on
a sample of the clients. Its Rényi DP at integer order α under Poisson sampling at rate q
(Mironov, Talwar & Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian
Mechanism", Sec. 3.3) is

    ε_α = log( Σ_k C(α, k) (1−q)^(α−k) q^k exp((k² − k) / (2σ²)) ) / (α − 1),

rounds compose by adding ε_α, and (ε, δ) follows from the tightest order by the conversion
of Canonne, Kamath & Steinke (2020) / Balle et al. (2020), as Google's ``dp_accounting``
and Opacus do. fedsim samples a fixed number of clients without replacement; treating that
as Poisson sampling at q = clients_per_round / pool is the approximation DP-FedAvg
(McMahan et al., ICLR 2018) and TensorFlow Federated use, and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import gammaln, logsumexp

#: integer Rényi orders searched for the tightest ε
ORDERS: tuple[int, ...] = tuple(range(2, 257))


def rdp_sampled_gaussian(q: float, noise_multiplier: float,
                         orders: tuple[int, ...] = ORDERS) -> np.ndarray:
    """Rényi DP ε_α of one Poisson-subsampled Gaussian mechanism, per integer order."""
    if not 0 <= q <= 1:
        raise ValueError(f"sampling rate q must be in [0, 1], got {q}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if any(int(a) != a or a < 2 for a in orders):
        raise ValueError("orders must be integers >= 2")
    out = np.empty(len(orders))
    for i, alpha in enumerate(orders):
        if q == 0:
            out[i] = 0.0
        elif noise_multiplier == 0:
            out[i] = math.inf
        elif q == 1:  # the Gaussian mechanism itself
            out[i] = alpha / (2 * noise_multiplier**2)
        else:
            k = np.arange(alpha + 1)
            log_terms = (gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
                         + (alpha - k) * math.log1p(-q) + k * math.log(q)
                         + (k * k - k) / (2 * noise_multiplier**2))
            out[i] = logsumexp(log_terms) / (alpha - 1)
    return out


def epsilon_from_rdp(rdp: np.ndarray, delta: float,
                     orders: tuple[int, ...] = ORDERS) -> tuple[float, int]:
    """The smallest ε over ``orders`` at ``delta`` for composed Rényi DP ``rdp``, and its order."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not np.any(rdp):  # a mechanism that reveals nothing (e.g. nobody sampled)
        return 0.0, int(orders[0])
    a = np.asarray(orders, dtype=float)
    eps = rdp + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    eps = np.where(np.isnan(eps), np.inf, eps)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), int(orders[best])


@dataclass(frozen=True)
class PrivacySpent:
    """What a run's DP rounds cost, and the assumptions behind the number."""

    epsilon: float
    delta: float
    order: int | None  # the Rényi order that gave the tightest ε (None: nothing released)
    rounds: int  # noised aggregations composed
    sampling_rate: float
    noise_multiplier: float

    def as_dict(self) -> dict:
        return {**asdict(self), "accountant": "RDP, subsampled Gaussian (Mironov et al. 2019)",
                "assumes": "clients sampled by Poisson sampling at rate sampling_rate "
                           "(fedsim samples a fixed number without replacement: the usual "
                           "DP-FedAvg approximation); covers the noised arrays only, not "
                           "excluded arrays or the metrics clients report in the clear"}


def privacy_spent(sampling_rate: float, noise_multiplier: float, rounds: int,
                  delta: float) -> PrivacySpent:
    """(ε, δ) after ``rounds`` noised aggregations of the subsampled Gaussian mechanism."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    rdp = rdp_sampled_gaussian(sampling_rate, noise_multiplier)  # validates the arguments
    if rounds == 0:  # nothing released yet: no privacy spent
        epsilon_from_rdp(rdp, delta)  # (validates delta)
        return PrivacySpent(0.0, delta, None, 0, sampling_rate, noise_multiplier)
    eps, order = epsilon_from_rdp(rounds * rdp, delta)
    return PrivacySpent(eps, delta, order, rounds, sampling_rate, noise_multiplier)
