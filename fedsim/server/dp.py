"""Central differential privacy around any strategy, on the model's float parameters.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` and ``...AdaptiveClipping``
(DP-FedAvg, McMahan et al., ICLR 2018; adaptive clipping, Andrew et al., NeurIPS 2021) clip
every array of every reply against the current global arrays and add Gaussian noise to
every array of the aggregate. On a real state dict that breaks twice: BatchNorm's integer
``num_batches_tracked`` crashes the in-place clipping (``int64 *= float``), and running
statistics are not part of what is being privatised (they are not updates of a loss) yet
would eat clipping budget and be noised. fedsim therefore runs Flower's wrappers unchanged
on a restricted view:

- **covered**: the model's float parameters (``named_parameters``) that clients upload.
  Each client's update of them is clipped to the clipping norm (jointly, one L2 norm), and
  Gaussian noise of std ``noise_multiplier · clipping_norm / clients_per_round`` is added to
  their aggregate — Flower's own code does both.
- **excluded**: everything else a client uploads — BatchNorm running statistics and
  counters, and hook extras such as SCAFFOLD's control-variate deltas. The wrapped strategy
  aggregates them as usual, unclipped and un-noised: **they are outside the DP guarantee**.
  ``summary.json`` lists them under ``dp.excluded_arrays``.
- arrays a strategy keeps on the clients (FedBN's normalization layers, SiloBN's
  statistics) are never uploaded, so they neither need nor get noise.

The σ·C/m noise calibration assumes an unweighted mean of the m clipped updates, so under
DP fedsim averages client updates with equal weights (``dp.client_weights = "uniform"``)
when the wrapped strategy is a FedAvg subclass. Flower draws the noise from numpy's global
generator; fedsim seeds it from ``(seed, "dp-noise", round)`` around each aggregation, so DP
runs are reproducible.

Each noised aggregation is counted; ``summary.json`` ``dp.privacy_spent`` gives the (ε, δ)
they add up to (``fedsim.privacy.accountant``: dp_accounting's PLD and RDP accountants for
the Poisson-subsampled Gaussian, with sampling rate clients_per_round / participating clients
and the requested noise multiplier, which adaptive clipping splits between the update and the
clipped count).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from torch import nn

from fedsim.compat import add_gaussian_noise_inplace, compute_stdv
from fedsim.config import Scenario
from fedsim.errors import PrivacyBudgetSpent, ScenarioError
from fedsim.privacy.accountant import ACCOUNTANT, epsilon, noise_for_epsilon
from fedsim.rng import derive_seed
from fedsim.server.dp_analysis import why_not
from fedsim.server.strategies import strategy_class

COVERS = (
    "the model's float parameters uploaded by clients: each client's update of them is "
    "clipped (one L2 norm over all of them) and Gaussian noise is added to their aggregate"
)


@contextlib.contextmanager
def numpy_global_seed(seed: int, *parts: str | int) -> Iterator[None]:
    """Seed numpy's global generator (which Flower's DP code draws from), then restore it."""
    saved = np.random.get_state()
    np.random.seed(derive_seed(seed, *parts) % 2**32)
    try:
        yield
    finally:
        np.random.set_state(saved)


class _Rejoin(Strategy):
    """Sits between Flower's DP wrapper and the real strategy: puts back what DP must not see.

    Before clipping, the DP wrapper hands each reply to Flower's code with only its covered
    arrays; this proxy merges the excluded arrays back (in their original order) before the
    wrapped strategy aggregates, and makes client weights uniform if asked to.
    """

    def __init__(self, strategy: Strategy, uniform_weights: bool) -> None:
        self.strategy = strategy
        self.uniform_weights = uniform_weights
        self.stash: dict[int, ArrayRecord] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                continue
            original = self.stash.pop(id(reply))
            clipped = reply.content["arrays"]
            reply.content["arrays"] = ArrayRecord(
                {k: clipped[k] if k in clipped else original[k] for k in original}
            )
            if self.uniform_weights:
                metrics = next(iter(reply.content.metric_records.values()))
                metrics[self.strategy.weighted_by_key] = 1
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


class _ParametersOnly:
    """Mixin for Flower's server-side DP wrappers: clip and noise the covered arrays only."""

    def _setup(self, strategy: Strategy, parameter_names: list[str] | None, seed: int,
               kind: str, noise_multiplier: float, sampling_rate: float, delta: float,
               max_epsilon: float, calibrated_for: dict | None) -> None:
        uniform = isinstance(strategy, FedAvg)
        self.why_not = why_not(type(strategy))  # None: the DP-FedAvg ε holds for it
        self.max_epsilon = max_epsilon
        self.calibrated_for = calibrated_for
        self.stopped: str | None = None
        self.strategy = _Rejoin(strategy, uniform)
        self.parameter_names = parameter_names
        self.seed = seed
        self.kind = kind
        self.requested_noise_multiplier = noise_multiplier
        self.sampling_rate = sampling_rate
        self.delta = delta
        self.noised_rounds = 0  # aggregations released with noise: what the accountant composes
        self.noised: set[str] = set()
        self.excluded: set[str] = set()
        self.local: set[str] = set()
        self.noise_stddev: float | None = None
        self._global = ArrayRecord()
        self._covered: list[str] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.parameter_names is None:
            raise RuntimeError("the DP wrapper was built without the model's parameter names; "
                               "pass the model to fedsim.server.factory.make_strategy")
        replies = list(replies)
        valid = [r for r in replies if not r.has_error()]
        params = set(self.parameter_names)
        keys = list(valid[0].content["arrays"].keys()) if valid else []
        self._covered = [k for k in keys if k in params]
        self.excluded.update(k for k in keys if k not in params)
        self.local.update(k for k in self._global if k not in keys)
        self.strategy.stash = {}
        for reply in valid:
            record = reply.content["arrays"]
            self.strategy.stash[id(reply)] = record
            reply.content["arrays"] = ArrayRecord({k: record[k] for k in self._covered})
        self.current_arrays = ArrayRecord({k: self._global[k] for k in self._covered})
        with numpy_global_seed(self.seed, "dp-noise", server_round):
            return super().aggregate_train(server_round, replies)

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        """Flower's noising step, restricted to the covered arrays."""
        noisy = [aggregated[k].numpy() for k in self._covered]
        self.noise_stddev = compute_stdv(self.noise_multiplier, self.clipping_norm,
                                         self.num_sampled_clients)
        add_gaussian_noise_inplace(noisy, self.noise_stddev)
        self.noised_rounds += 1
        self.noised.update(self._covered)
        out = dict(zip(self._covered, noisy, strict=True))
        return ArrayRecord({k: Array(np.asarray(out[k])) if k in out else aggregated[k]
                            for k in aggregated})

    def dp_report(self) -> dict:
        """What DP covered in this run (``summary.json`` ``dp``)."""
        return {
            "kind": self.kind,
            "noise_multiplier": self.requested_noise_multiplier,
            "effective_noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "noise_stddev": self.noise_stddev,
            "num_sampled_clients": self.num_sampled_clients,
            "covers": COVERS,
            "noised_arrays": sorted(self.noised),
            "excluded_arrays": sorted(self.excluded),
            "excluded_note": "uploaded and aggregated without clipping or noise: outside the "
                             "DP guarantee",
            "local_arrays": sorted(self.local),
            "local_note": "kept on the clients, never uploaded",
            "client_weights": "uniform" if self.strategy.uniform_weights
            else "as the wrapped strategy weighs them",
            "privacy_spent": self.privacy_spent(),
            "max_epsilon": self.max_epsilon or None,
            "calibrated_for": self.calibrated_for,
            "stopped": self.stopped,
        }

    def stop_before_round(self, server_round: int) -> None:
        """Raise PrivacyBudgetSpent if this round would take ε above ``max_epsilon``."""
        if not self.max_epsilon:
            return
        eps = epsilon(self.requested_noise_multiplier, self.sampling_rate,
                      self.noised_rounds + 1, self.delta).value
        if eps > self.max_epsilon:
            self.stopped = (f"round {server_round} would spend ε = {eps:.3g} > "
                            f"server.dp.max_epsilon = {self.max_epsilon:g}")
            raise PrivacyBudgetSpent(self.stopped, round=server_round)

    def privacy_spent(self) -> dict:
        """The (ε, δ) of the noised rounds so far (ε None: no noise, no finite bound).

        ``epsilon`` is the PLD accountant's (tighter); ``rdp`` and ``pld`` keep both.
        """
        spent = epsilon(self.requested_noise_multiplier, self.sampling_rate,
                        self.noised_rounds, self.delta)
        out = {**spent.as_dict(), "rounds": spent.steps, "accountant": ACCOUNTANT}
        del out["steps"]  # called rounds here
        out["covers"] = ("the noised arrays only, not excluded arrays or the metrics "
                         "clients report in the clear")
        for key in ("epsilon", "rdp", "pld"):
            if not math.isfinite(out[key]):
                out[key] = None
        out["why_not"] = self.why_not
        if self.why_not is not None:  # the numbers stay, for reference, but are no ε of this run
            out["epsilon"] = None
        return out

    def fedsim_summary(self) -> dict:
        return {"dp": self.dp_report()}


class ParameterDPFixedClipping(_ParametersOnly, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping on the model's float parameters only."""

    def __init__(self, strategy: Strategy, noise_multiplier: float, clipping_norm: float,
                 num_sampled_clients: int, parameter_names: list[str] | None, seed: int,
                 sampling_rate: float = 1.0, delta: float = 1e-5, max_epsilon: float = 0.0,
                 calibrated_for: dict | None = None) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self._setup(strategy, parameter_names, seed, "fixed", noise_multiplier, sampling_rate,
                    delta, max_epsilon, calibrated_for)


class ParameterDPAdaptiveClipping(_ParametersOnly, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping on the model's float parameters only."""

    def __init__(self, strategy: Strategy, noise_multiplier: float, num_sampled_clients: int,
                 initial_clipping_norm: float, target_clipped_quantile: float,
                 clip_norm_lr: float, clipped_count_stddev: float | None,
                 parameter_names: list[str] | None, seed: int, sampling_rate: float = 1.0,
                 delta: float = 1e-5, max_epsilon: float = 0.0,
                 calibrated_for: dict | None = None) -> None:
        super().__init__(strategy, noise_multiplier, num_sampled_clients, initial_clipping_norm,
                         target_clipped_quantile, clip_norm_lr, clipped_count_stddev)
        self._setup(strategy, parameter_names, seed, "adaptive", noise_multiplier, sampling_rate,
                    delta, max_epsilon, calibrated_for)


def sampling_rate(scenario: Scenario) -> float:
    """q: clients_per_round over the pool clients are sampled from (Poisson assumed)."""
    return scenario.server.clients_per_round / scenario.num_participating


def calibration(scenario: Scenario) -> dict | None:
    """``server.dp.target_epsilon`` → ``{noise_multiplier, target_epsilon, rounds, delta,
    sampling_rate}`` for the planned ``server.rounds`` (None when no target is set)."""
    cfg = scenario.server.dp
    if cfg.kind == "none" or not cfg.target_epsilon:
        return None
    rate, rounds = sampling_rate(scenario), scenario.server.rounds
    try:
        sigma = noise_for_epsilon(cfg.target_epsilon, rate, rounds, cfg.delta)
    except ValueError as exc:
        raise ScenarioError(f"server.dp.target_epsilon = {cfg.target_epsilon!r}: {exc}") from None
    return {"noise_multiplier": sigma, "target_epsilon": cfg.target_epsilon, "rounds": rounds,
            "delta": cfg.delta, "sampling_rate": rate}


def start_lines(scenario: Scenario) -> list[str]:
    """What a DP run says before it starts: a calibrated σ, or a ``warning:`` that no ε holds."""
    if scenario.server.dp.kind == "none":
        return []
    lines = []
    if (cal := calibration(scenario)) is not None:
        lines.append(f"DP: noise_multiplier = {cal['noise_multiplier']:.4g}, calibrated for "
                     f"ε = {cal['target_epsilon']:g} at δ = {cal['delta']:g} after "
                     f"{cal['rounds']} rounds (sampling rate {cal['sampling_rate']:.3g})")
    if (reason := why_not(strategy_class(scenario.server.strategy))) is not None:
        lines.append(f"warning: server.dp: no ε is reported (dp.privacy_spent.epsilon = null): "
                     f"{reason}")
    return lines


def wrap_dp(strategy: Strategy, scenario: Scenario, model: nn.Module | None) -> Strategy:
    """Wrap ``strategy`` as ``[server.dp]`` asks; bad DP settings are a ScenarioError."""
    cfg = scenario.server.dp
    names = [n for n, _ in model.named_parameters()] if model is not None else None
    m = scenario.server.clients_per_round
    rate = sampling_rate(scenario)
    cal = calibration(scenario)
    sigma = cfg.noise_multiplier if cal is None else cal["noise_multiplier"]
    calibrated_for = None if cal is None else {k: v for k, v in cal.items()
                                               if k != "noise_multiplier"}
    try:
        if cfg.kind == "fixed":
            return ParameterDPFixedClipping(strategy, sigma, cfg.clipping_norm, m, names,
                                            scenario.seed, rate, cfg.delta, cfg.max_epsilon,
                                            calibrated_for)
        if cfg.kind == "adaptive":
            return ParameterDPAdaptiveClipping(
                strategy, sigma, m, cfg.clipping_norm, cfg.target_clipped_quantile,
                cfg.clip_norm_lr, cfg.clipped_count_stddev or None, names, scenario.seed, rate,
                cfg.delta, cfg.max_epsilon, calibrated_for)
    except ValueError as exc:
        raise ScenarioError(f"[server.dp] kind = {cfg.kind!r}: {exc}") from None
    raise ScenarioError(f"server.dp.kind = {cfg.kind!r} is not a DP wrapper; use fixed or "
                        "adaptive (or none)")
