"""The (ε, δ) of DP rounds (or DP-SGD steps), from Google's ``dp_accounting``, for the sampling
that actually runs.

Each round releases the sum of the sampled participants' clipped contributions plus Gaussian
noise of ``noise_multiplier`` times the clipping norm: a Gaussian mechanism on a sample,
composed once per round (``SelfComposedDpEvent``). Which sample, and so which analysis, is a
:class:`Sampling`:

- ``"poisson"``: each participant joins independently with probability q, and the sum is
  divided by the *fixed* expected count (DP-FedAvg, McMahan et al., ICLR 2018, Algorithm 1;
  DP-SGD's Poisson batches, Abadi et al. 2016). Neighbouring datasets add or remove one
  participant, who moves the sum by at most C: ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``.
  Two accountants bound it: **PLD** (privacy loss distributions; Koskela et al. 2020,
  Doroshenko et al. 2022; pessimistic discretization, so an upper bound) — the reported one —
  and **RDP** (Mironov, Talwar & Zhang 2019, fractional orders in (1, 2) included, converted as
  in Canonne, Kamath & Steinke 2020).
- ``"fixed_size"``: exactly m of the N participants, drawn without replacement, and the mean
  taken over them — what Flower's strategies do. One participant's presence pushes another
  out, so neighbouring datasets *replace* one participant (N is public), who moves the sum by
  up to 2C: ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(σ / 2))`` under
  ``NeighboringRelation.REPLACE_ONE`` (Wang, Balle & Kasiviswanathan, AISTATS 2019), which
  dp_accounting bounds with RDP only (its PLD accountant does not support the event).

Poisson amplification does not hold for a fixed-size cohort: N = 100, m = 10, σ = 1, 100
rounds, δ = 1e-5 give ε = 7.05 (Poisson, PLD) but 83.9 (fixed size, RDP). The two relations
differ too: an add/remove guarantee of ε implies a replace-one guarantee of 2ε (group
privacy), not the converse; every record says which one it holds under.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

METHODS = ("pld", "rdp")
SAMPLINGS = ("fixed_size", "poisson")
#: the accountant whose ε is reported as "the" ε of Poisson sampling (tighter; both are bounds)
REPORTED = "pld"
#: PLD loss discretization: coarser than dp_accounting's 1e-4 default, so small noise
#: multipliers stay quick, and pessimistic, so still an upper bound (tests/privacy check it
#: against the default on a known case)
PLD_DISCRETIZATION = 1e-3

ADD_OR_REMOVE = "add_or_remove_one"
REPLACE = "replace_one"

SAMPLING_ASSUMPTION = (
    "each participant sampled independently (Poisson sampling) at rate sampling_rate, the sum "
    "divided by the fixed expected count; neighbouring datasets add or remove one participant")
FIXED_SIZE_ASSUMPTION = (
    "exactly cohort of the population participants sampled without replacement, the mean over "
    "them; neighbouring datasets replace one participant (sensitivity 2C of the sum)")
ACCOUNTANT = ("dp_accounting: Poisson sampling: PLD (reported) and RDP with fractional orders; "
              "fixed-size sampling without replacement: RDP (Wang, Balle & Kasiviswanathan "
              "2019) under the replace-one relation; one subsampled Gaussian per noised round")


@dataclass(frozen=True)
class Sampling:
    """How each release's participants are drawn: the part of the mechanism that decides
    which analysis holds (see the module docstring). Build it with :meth:`poisson` or
    :meth:`fixed_size`."""

    kind: str
    rate: float  # q: Poisson's inclusion probability; fixed size: cohort / population
    population: int = 0  # fixed size: N
    cohort: int = 0  # fixed size: m

    def __post_init__(self) -> None:
        if self.kind not in SAMPLINGS:
            raise ValueError(f"sampling {self.kind!r} is not one of {', '.join(SAMPLINGS)}")
        if self.kind == "fixed_size" and not 0 <= self.cohort <= self.population:
            raise ValueError(f"a fixed-size cohort of {self.cohort} from {self.population} "
                             "participants is impossible")
        if not 0 <= self.rate <= 1:
            raise ValueError(f"sampling rate must be in [0, 1], got {self.rate}")

    @classmethod
    def poisson(cls, rate: float) -> Sampling:
        """Each participant joins independently with probability ``rate``."""
        return cls("poisson", float(rate))

    @classmethod
    def fixed_size(cls, cohort: int, population: int) -> Sampling:
        """Exactly ``cohort`` of ``population`` participants, without replacement."""
        if population < 1:
            raise ValueError(f"a population needs at least one participant, got {population}")
        return cls("fixed_size", cohort / population, int(population), int(cohort))

    @property
    def relation(self) -> str:
        """The neighbouring relation the guarantee holds under."""
        return ADD_OR_REMOVE if self.kind == "poisson" else REPLACE

    @property
    def methods(self) -> tuple[str, ...]:
        """The accountants that support this sampling."""
        return METHODS if self.kind == "poisson" else ("rdp",)

    @property
    def reported(self) -> str:
        """The accountant whose ε is *the* ε: the tightest one that supports the sampling."""
        return REPORTED if self.kind == "poisson" else "rdp"

    @property
    def assumes(self) -> str:
        return SAMPLING_ASSUMPTION if self.kind == "poisson" else FIXED_SIZE_ASSUMPTION

    def event(self, noise_multiplier: float) -> dp_accounting.DpEvent:
        """One release: the Gaussian mechanism (σ over the sum's sensitivity) on the sample."""
        if self.kind == "poisson":
            return dp_accounting.PoissonSampledDpEvent(
                self.rate, dp_accounting.GaussianDpEvent(noise_multiplier))
        # replace-one moves the sum by 2C: the noise is σ/2 times the sensitivity
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.population, self.cohort, dp_accounting.GaussianDpEvent(noise_multiplier / 2))

    def accountant(self, method: str) -> Callable[[], dp_accounting.PrivacyAccountant]:
        """A factory of a fresh accountant of ``method`` for this sampling."""
        if method not in self.methods:
            raise ValueError(f"accountant {method!r} does not support {self.kind} sampling; "
                             f"use {' or '.join(self.methods)}")
        if method == "pld":
            return lambda: PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
        relation = (dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE if self.kind == "poisson"
                    else dp_accounting.NeighboringRelation.REPLACE_ONE)
        return lambda: RdpAccountant(neighboring_relation=relation)

    def as_dict(self) -> dict:
        out = {"sampling": self.kind, "sampling_rate": self.rate, "relation": self.relation}
        if self.kind == "fixed_size":
            out.update(population=self.population, cohort=self.cohort)
        return out


def as_sampling(sampling: Sampling | float) -> Sampling:
    """A :class:`Sampling`; a bare rate means Poisson sampling at that rate."""
    if isinstance(sampling, Sampling):
        return sampling
    if not 0 <= sampling <= 1:
        raise ValueError(f"sampling rate must be in [0, 1], got {sampling}")
    return Sampling.poisson(sampling)


@dataclass(frozen=True)
class Epsilon:
    """The ε of ``steps`` subsampled Gaussian releases at ``delta``, by each accountant that
    supports the sampling (``pld`` is None for fixed-size sampling)."""

    rdp: float
    pld: float | None
    delta: float
    noise_multiplier: float
    sampling: Sampling
    steps: int

    @property
    def value(self) -> float:
        """The ε fedsim reports: PLD's for Poisson sampling, RDP's for fixed-size."""
        return getattr(self, self.sampling.reported)

    @property
    def sampling_rate(self) -> float:
        return self.sampling.rate

    def as_dict(self) -> dict:
        return {"epsilon": self.value, "reported": self.sampling.reported, "rdp": self.rdp,
                "pld": self.pld, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                **self.sampling.as_dict(), "steps": self.steps, "assumes": self.sampling.assumes}


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


def _check(noise_multiplier: float, steps: int, delta: float) -> None:
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps (rounds) must be an integer >= 0, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def dp_event(noise_multiplier: float, sampling: Sampling | float,
             steps: int) -> dp_accounting.DpEvent:
    """The DpEvent of ``steps`` releases (what the accountants compose)."""
    return dp_accounting.SelfComposedDpEvent(as_sampling(sampling).event(noise_multiplier),
                                             int(steps))


@lru_cache(maxsize=4096)
def _epsilon_by(method: str, noise_multiplier: float, sampling: Sampling, steps: int,
                delta: float) -> float:
    if method not in METHODS:
        raise ValueError(f"accountant {method!r} is not one of {', '.join(METHODS)}")
    _check(noise_multiplier, steps, delta)
    make = sampling.accountant(method)
    if steps == 0 or sampling.rate == 0:  # nothing released (or nobody ever sampled)
        return 0.0
    if noise_multiplier == 0:  # the sum in the clear: no finite bound
        return math.inf
    with _quiet_absl():
        eps = make().compose(dp_event(noise_multiplier, sampling, steps)).get_epsilon(delta)
    return max(0.0, float(eps))


def epsilon_by(method: str, noise_multiplier: float, sampling: Sampling | float, steps: int,
               delta: float) -> float:
    """ε of one accountant (``"pld"`` or ``"rdp"``); 0 with nothing released, inf without
    noise. ``sampling``: a :class:`Sampling`, or a rate q for Poisson sampling."""
    return _epsilon_by(method, noise_multiplier, as_sampling(sampling), int(steps), delta)


def epsilon(noise_multiplier: float, sampling: Sampling | float, steps: int,
            delta: float) -> Epsilon:
    """(ε, δ) after ``steps`` noised releases, by every accountant that supports the sampling.

    Parameters
    ----------
    noise_multiplier : σ, the noise std over the clipping norm (on the sum of clipped values)
    sampling : a :class:`Sampling`, or q for Poisson sampling at rate q
    steps : noised releases composed
    delta : the δ of (ε, δ)
    """
    sampling = as_sampling(sampling)
    _check(noise_multiplier, steps, delta)
    pld = (epsilon_by("pld", noise_multiplier, sampling, steps, delta)
           if "pld" in sampling.methods else None)
    return Epsilon(rdp=epsilon_by("rdp", noise_multiplier, sampling, steps, delta), pld=pld,
                   delta=delta, noise_multiplier=noise_multiplier, sampling=sampling,
                   steps=int(steps))


@lru_cache(maxsize=256)
def _noise_for(target_epsilon: float, sampling: Sampling, steps: int, delta: float,
               method: str, rtol: float) -> float:
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ValueError(f"target epsilon must be a finite number > 0, got {target_epsilon}")
    _check(0.0, steps, delta)
    if method not in METHODS:
        raise ValueError(f"accountant {method!r} is not one of {', '.join(METHODS)}")
    make = sampling.accountant(method)
    if steps == 0 or sampling.rate == 0:
        return 0.0  # nothing is released: any σ meets any target

    def eps(sigma: float) -> float:
        return _epsilon_by(method, sigma, sampling, steps, delta)

    low, high = 1.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 reaches ε = {target_epsilon:g}")
    while eps(low) <= target_epsilon:
        low, high = low / 2, low
        if low < 1e-3:
            return high  # ε is tiny even at σ ≈ 0.001 (e.g. q tiny): do not chase it
    with _quiet_absl():
        sigma = dp_accounting.calibrate_dp_mechanism(
            make, lambda s: dp_event(s, sampling, steps), target_epsilon, delta,
            dp_accounting.ExplicitBracketInterval(low, high), tol=rtol * low)
    return float(sigma)


def noise_for_epsilon(target_epsilon: float, sampling: Sampling | float, steps: int,
                      delta: float, method: str | None = None, rtol: float = 1e-4) -> float:
    """The smallest σ (within ``rtol``) whose ε after ``steps`` releases is at most the target.

    ``method`` defaults to the sampling's reported accountant. The bracket is found by
    doubling/halving around σ = 1, then dp_accounting's ``calibrate_dp_mechanism`` (Brent's
    method, returning a σ on the safe side) narrows it, so
    ``epsilon_by(method, result, ...) <= target_epsilon`` always holds.
    """
    sampling = as_sampling(sampling)
    return _noise_for(target_epsilon, sampling, int(steps), delta,
                      method or sampling.reported, rtol)
