"""The (ε, δ) of central DP-FedAvg rounds, from Google's ``dp_accounting``.

Each DP round releases the aggregate of the sampled clients' clipped updates plus Gaussian
noise of ``noise_multiplier`` times the clipping norm (on the sum): a Gaussian mechanism on
a sample of the clients, ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``, composed once per
round (``SelfComposedDpEvent``). Two accountants bound the composition:

- **RDP** (Mironov, Talwar & Zhang 2019) at dp_accounting's default orders, fractional ones
  in (1, 2) included (without them the bound is loose at small σ), converted to (ε, δ) as in
  Canonne, Kamath & Steinke (2020);
- **PLD** (privacy loss distributions; Koskela et al. 2020, Doroshenko et al. 2022), with
  dp_accounting's pessimistic discretization, so it is an upper bound too, and a tighter one.

fedsim reports the PLD ε as *the* ε (:attr:`Epsilon.value`): both are valid upper bounds on
the same mechanism, and PLD is the tighter (σ = 0.5, q = 0.1, 50 rounds, δ = 1e-5: 22.6 vs
25.9). The RDP ε is kept beside it because most papers (Opacus, TF Privacy) quote RDP.

fedsim samples a fixed number of clients without replacement; treating that as Poisson
sampling at q = clients_per_round / participating clients is the approximation DP-FedAvg
(McMahan et al., ICLR 2018) and TensorFlow Federated use; :data:`SAMPLING_ASSUMPTION` says so
in every report.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

#: the accountant whose ε is reported as "the" ε
REPORTED = "pld"
METHODS = ("pld", "rdp")
#: PLD loss discretization: coarser than dp_accounting's 1e-4 default, so small noise
#: multipliers stay quick, and pessimistic, so still an upper bound (tests/privacy check it
#: against the default on a known case)
PLD_DISCRETIZATION = 1e-3

SAMPLING_ASSUMPTION = (
    "clients sampled by Poisson sampling at rate sampling_rate = clients_per_round / "
    "participating clients (fedsim samples a fixed number without replacement: the standard "
    "DP-FedAvg approximation)"
)
ACCOUNTANT = ("dp_accounting: PLD (reported) and RDP with fractional orders, "
              "Poisson-subsampled Gaussian composed once per noised round")


@dataclass(frozen=True)
class Epsilon:
    """The ε of ``steps`` Poisson-subsampled Gaussian rounds at ``delta``, by both accountants."""

    rdp: float
    pld: float
    delta: float
    noise_multiplier: float
    sampling_rate: float
    steps: int
    assumes: str = SAMPLING_ASSUMPTION

    @property
    def value(self) -> float:
        """The ε fedsim reports: the PLD one (tighter; both are upper bounds)."""
        return getattr(self, REPORTED)

    def as_dict(self) -> dict:
        return {"epsilon": self.value, "reported": REPORTED, **asdict(self)}


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp_accounting logs (via absl) each fractional order it drops as non-convergent."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _check(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> None:
    if not 0 <= sampling_rate <= 1:
        raise ValueError(f"sampling rate must be in [0, 1], got {sampling_rate}")
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps (rounds) must be an integer >= 0, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def dp_event(noise_multiplier: float, sampling_rate: float, steps: int) -> dp_accounting.DpEvent:
    """The DpEvent of ``steps`` DP-FedAvg rounds (what both accountants compose)."""
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sampling_rate,
                                            dp_accounting.GaussianDpEvent(noise_multiplier)),
        int(steps))


@lru_cache(maxsize=4096)
def epsilon_by(method: str, noise_multiplier: float, sampling_rate: float, steps: int,
               delta: float) -> float:
    """ε of one accountant (``"pld"`` or ``"rdp"``); 0 with nothing released, inf without noise."""
    if method not in METHODS:
        raise ValueError(f"accountant {method!r} is not one of {', '.join(METHODS)}")
    _check(noise_multiplier, sampling_rate, steps, delta)
    if steps == 0 or sampling_rate == 0:  # nothing released (or nobody ever sampled)
        return 0.0
    if noise_multiplier == 0:  # the clipped mean in the clear: no finite bound
        return math.inf
    accountant = (PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
                  if method == "pld" else RdpAccountant())
    with _quiet_absl():
        eps = accountant.compose(dp_event(noise_multiplier, sampling_rate, steps)
                                 ).get_epsilon(delta)
    return max(0.0, float(eps))


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int,
            delta: float) -> Epsilon:
    """(ε, δ) after ``steps`` noised rounds of DP-FedAvg, by the RDP and the PLD accountant.

    Parameters
    ----------
    noise_multiplier : σ, the noise std over the clipping norm (on the sum of clipped updates)
    sampling_rate : q, the chance each client is in a round (Poisson sampling assumed)
    steps : noised rounds composed
    delta : the δ of (ε, δ)
    """
    return Epsilon(rdp=epsilon_by("rdp", noise_multiplier, sampling_rate, steps, delta),
                   pld=epsilon_by("pld", noise_multiplier, sampling_rate, steps, delta),
                   delta=delta, noise_multiplier=noise_multiplier,
                   sampling_rate=sampling_rate, steps=int(steps))


@lru_cache(maxsize=256)
def noise_for_epsilon(target_epsilon: float, sampling_rate: float, steps: int, delta: float,
                      method: str = REPORTED, rtol: float = 1e-4) -> float:
    """The smallest σ (within ``rtol``) whose ε after ``steps`` rounds is at most the target.

    The bracket is found by doubling/halving around σ = 1, then dp_accounting's
    ``calibrate_dp_mechanism`` (Brent's method, returning a σ on the safe side) narrows it, so
    ``epsilon_by(method, result, ...) <= target_epsilon`` always holds.
    """
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ValueError(f"target epsilon must be a finite number > 0, got {target_epsilon}")
    _check(0.0, sampling_rate, steps, delta)
    if method not in METHODS:
        raise ValueError(f"accountant {method!r} is not one of {', '.join(METHODS)}")
    if steps == 0 or sampling_rate == 0:
        return 0.0  # nothing is released: any σ meets any target

    def eps(sigma: float) -> float:
        return epsilon_by(method, sigma, sampling_rate, steps, delta)

    low, high = 1.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 reaches ε = {target_epsilon:g}")
    while eps(low) <= target_epsilon:
        low, high = low / 2, low
        if low < 1e-3:
            return high  # ε is tiny even at σ ≈ 0.001 (e.g. q tiny): do not chase it
    make = {"pld": lambda: PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION),
            "rdp": RdpAccountant}[method]
    with _quiet_absl():
        sigma = dp_accounting.calibrate_dp_mechanism(
            make, lambda s: dp_event(s, sampling_rate, steps), target_epsilon, delta,
            dp_accounting.ExplicitBracketInterval(low, high), tol=rtol * low)
    return float(sigma)
