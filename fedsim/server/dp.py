"""Central differential privacy around any strategy, on the model's float parameters.

DP-FedAvg (McMahan et al., ICLR 2018) clips each client's update to a norm C and adds
Gaussian noise to the aggregate; adaptive clipping (Andrew et al., NeurIPS 2021) moves C
toward a quantile of the update norms. fedsim subclasses Flower's
``DifferentialPrivacyServerSideFixedClipping`` and ``...AdaptiveClipping`` (their settings,
checks and noise split) and uses Flower's noising helper, but runs its own sampling, clipping
(:func:`clip_update`: Flower's divides a zero update by its norm) and aggregation, for five
reasons:

- **What is covered**: the model's float parameters (``named_parameters``) that clients
  upload. Each client's update of them is clipped (one L2 norm over all of them) and noise is
  added to their aggregate. Everything else a client uploads — BatchNorm running statistics
  and counters, hook extras such as SCAFFOLD's Δc — is aggregated by the wrapped strategy
  unclipped and un-noised (Flower's own wrappers crash on the integer ``num_batches_tracked``);
  such arrays void the guarantee (:func:`fedsim.server.dp_analysis.unnoised_why`), so
  ``privacy_spent.epsilon`` is null. Arrays a strategy keeps on the clients (FedBN, SiloBN)
  are never uploaded: ``dp.local_arrays``.
- **Sampling** (``server.dp.sampling``): ``"fixed_size"`` is Flower's — exactly m =
  ``clients_per_round`` clients, the mean over the replies — accounted as sampling without
  replacement under replace-one adjacency (:mod:`fedsim.privacy.accountant`); ``"poisson"``
  samples each client independently with probability q = m / N (derived from
  ``(seed, "dp-poisson", round)`` over the clients in id order, so every engine trains the
  same ones) and divides the sum by the fixed m (McMahan et al. 2018, Algorithm 1), so a
  round is released whatever replies arrive, none included (then it is the noise alone).
- **Noise for the denominator used**: noise std ``σ·C / D`` on a mean over D clipped
  updates keeps the sum's noise at σ·C. Poisson: D = m always. Fixed size: D = the replies
  averaged; a round with fewer replies than m follows ``on_fewer_replies``: ``scale_noise``
  (D = the replies; the ε stays valid), ``refuse`` (the round is not aggregated: nothing is
  released) or ``void`` (noise for m, i.e. weaker, and ε = null with why). Such rounds are
  counted in ``dp.fewer_replies``.
- **Adaptive clipping that converges**: C moves by the *unclipped* fraction (Andrew et al.
  2021, Algorithm 1): C ← C·exp(−η(b̄ − γ)) with b̄ the noised fraction of updates at most C
  and γ = 1 − ``target_clipped_quantile``. Flower 1.42's ``_geometric_update`` feeds the
  *clipped* fraction into the same formula, so C runs away (from C₀ = 1 with update norms
  uniform in [0.5, 1.5] it falls to 0.003 in 60 rounds; from C₀ = 3 it grows to 1,210). The
  round's noise is calibrated to the C its updates were clipped with (Flower uses the
  updated one, which can be smaller).
- **Reproducible noise**: Flower's helpers draw from numpy's global generator; fedsim seeds
  it from ``(seed, "dp-noise", round)`` around each aggregation.

The σ·C/D calibration assumes an unweighted mean of the clipped updates, so fedsim averages
client updates with equal weights (``dp.client_weights = "uniform"``) when the wrapped strategy
is a FedAvg subclass. Each released aggregation is counted; ``summary.json``
``dp.privacy_spent`` gives the (ε, δ) they add up to for the sampling that ran, with the
requested noise multiplier (which adaptive clipping splits between the update and the
unclipped count).
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

from fedsim.compat import add_gaussian_noise_inplace
from fedsim.config import Scenario
from fedsim.engine.grid_proxy import DelegatingGrid
from fedsim.errors import PrivacyBudgetSpent, ScenarioError
from fedsim.models.norm import has_statistics
from fedsim.privacy.accountant import ACCOUNTANT, Sampling, epsilon, noise_for_epsilon
from fedsim.rng import derive_seed, numpy_rng
from fedsim.server.dp_analysis import predicted_unnoised, unnoised_why, why_not
from fedsim.server.strategies import strategy_class
from fedsim.server.wrapping import WrappingStrategy

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


def poisson_sample(node_ids: Iterable[int], rate: float, seed: int, rnd: int) -> list[int]:
    """Each node independently with probability ``rate``, drawn from ``(seed, "dp-poisson",
    round)`` over the nodes in the order given (client-id order on fedsim's grids)."""
    nodes = list(node_ids)
    keep = numpy_rng(seed, "dp-poisson", rnd).random(len(nodes)) < rate
    return [n for n, k in zip(nodes, keep, strict=True) if k]


def clip_update(update: list[np.ndarray], clipping_norm: float) -> bool:
    """Scale ``update`` in place to L2 norm (over all its arrays) at most ``clipping_norm``;
    returns whether it was scaled. Flower's ``FlatClip`` helpers, except that a zero update
    (a client that took no step) is left as it is rather than divided by its norm."""
    norm = math.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in update))
    if norm <= clipping_norm:
        return False
    for u in update:
        u *= clipping_norm / norm
    return True


def geometric_update(clipping_norm: float, unclipped_fraction: float, target_unclipped: float,
                     lr: float) -> float:
    """Andrew et al. (2021), Algorithm 1: ``C·exp(−lr·(b̄ − γ))``, b̄ the (noised) fraction of
    updates with norm at most C, γ the target fraction. Too many unclipped updates shrink C,
    too few grow it, so C settles where a fraction γ of the norms lies below it."""
    return clipping_norm * math.exp(-lr * (unclipped_fraction - target_unclipped))


def poisson_refusal(strategy: Strategy) -> str | None:
    """Why Poisson sampling cannot run around ``strategy`` (None: it can). It is the mechanism
    of the DP-FedAvg analysis, run for the FedAvg-family strategies that analysis holds for."""
    reason = why_not(type(strategy))
    if isinstance(strategy, FedAvg) and reason is None:
        return None
    return ("server.dp.sampling = 'poisson' runs only around strategies the DP-FedAvg analysis "
            f"holds for (fedavg, fedprox, fedbn, silobn), not {type(strategy).__name__} "
            f"({reason or 'not a FedAvg'}); use server.dp.sampling = 'fixed_size'")


class _SampledGrid(DelegatingGrid):
    """The grid a strategy samples from, listing only the nodes the DP wrapper drew."""

    def __init__(self, base: Grid, nodes: list[int]) -> None:
        super().__init__(base)
        self.nodes = nodes

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)


class _Rejoin(WrappingStrategy):
    """Sits between the DP wrapper and the real strategy: puts back what DP must not see.

    Before clipping, the DP wrapper hands each reply on with only its covered arrays; this
    proxy merges the excluded arrays back (in their original order) before the wrapped
    strategy aggregates, and makes client weights uniform if asked to.
    """

    def __init__(self, strategy: Strategy, uniform_weights: bool) -> None:
        super().__init__(strategy)
        self.uniform_weights = uniform_weights
        self.stash: dict[int, ArrayRecord] = {}

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


class _ParametersOnly:
    """Mixin for Flower's server-side DP wrappers: fedsim's sampling, clipping and noising of
    the covered arrays (module docstring)."""

    def _setup(self, strategy: Strategy, parameter_names: list[str] | None, seed: int,
               kind: str, noise_multiplier: float, sampling: str, population: int,
               delta: float, max_epsilon: float, on_fewer_replies: str,
               calibrated_for: dict | None, target_clipped_quantile: float = 0.5) -> None:
        uniform = isinstance(strategy, FedAvg)
        self.why_not = why_not(type(strategy))  # None: the DP-FedAvg ε holds for the class
        if sampling == "poisson":
            if (why := poisson_refusal(strategy)) is not None:
                raise ValueError(why)
            # the wrapper samples; the strategy configures every node it is handed
            strategy.fraction_train, strategy.min_train_nodes = 1.0, 0
            strategy.min_available_nodes = 0
        self.max_epsilon = max_epsilon
        self.calibrated_for = calibrated_for
        self.stopped: str | None = None
        self.strategy = _Rejoin(strategy, uniform)
        self.parameter_names = parameter_names
        self.seed = seed
        self.kind = kind
        self.requested_noise_multiplier = noise_multiplier
        self.sampling = sampling
        self.population = population
        self.delta = delta
        self.on_fewer_replies = on_fewer_replies
        self.target_unclipped = 1.0 - target_clipped_quantile
        self.noised_rounds = 0  # aggregations released with noise: what the accountant composes
        self.fewer_replies: list[dict] = []  # fixed-size rounds with fewer replies than m
        self.noised: set[str] = set()
        self.excluded: set[str] = set()
        self.local: set[str] = set()
        self.noise_stddev: float | None = None
        self.unclipped_fraction: float | None = None  # adaptive: the last round's noised b̄
        self._global = ArrayRecord()
        self._covered: list[str] = []

    # -- sampling -------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays
        self.current_arrays = arrays
        if self.sampling == "poisson":
            rate = self.num_sampled_clients / self.population
            grid = _SampledGrid(grid, poisson_sample(grid.get_node_ids(), rate, self.seed,
                                                     server_round))
        return self.strategy.configure_train(server_round, arrays, config, grid)

    @property
    def releases_every_round(self) -> bool:
        """Whether every round is aggregated whatever replies arrive (Poisson sampling: a
        retry of a small sample would change the sampling the accountant assumes)."""
        return self.sampling == "poisson"

    def accounting(self) -> Sampling:
        """The sampling the accountant analyses."""
        if self.sampling == "poisson":
            return Sampling.poisson(self.num_sampled_clients / self.population)
        return Sampling.fixed_size(self.num_sampled_clients, self.population)

    # -- aggregation ----------------------------------------------------------------
    def _denominator(self, server_round: int, replies: int) -> int | None:
        """D of the noise std σ·C/D, or None when the round is refused."""
        m = self.num_sampled_clients
        if self.sampling == "poisson":
            return m
        if replies >= m:
            return replies
        action = {"scale_noise": "noise scaled to the replies averaged",
                  "refuse": "not aggregated (nothing released)",
                  "void": "noise for clients_per_round: weaker than calibrated, epsilon void",
                  }[self.on_fewer_replies]
        self.fewer_replies.append({"round": server_round, "replies": replies,
                                   "calibrated_for": m, "action": action,
                                   "noise_stddev": None})
        if self.on_fewer_replies == "refuse":
            return None
        return replies if self.on_fewer_replies == "scale_noise" else m

    def _split(self, valid: list[Message]) -> None:
        """Keep only the covered arrays in each reply (the rest waits in the proxy's stash)."""
        params = set(self.parameter_names)
        keys = list(valid[0].content["arrays"].keys()) if valid else []
        if valid:
            self._covered = [k for k in keys if k in params]
        elif not self._covered:  # a first round nobody answered: every float parameter
            self._covered = [k for k in self._global if k in params]
        self.excluded.update(k for k in keys if k not in params)
        if valid:
            self.local.update(k for k in self._global if k not in keys)
        self.strategy.stash = {}
        for reply in valid:
            record = reply.content["arrays"]
            self.strategy.stash[id(reply)] = record
            reply.content["arrays"] = ArrayRecord({k: record[k] for k in self._covered})

    def _clip(self, valid: list[Message], clipping_norm: float) -> int:
        """Clip each reply's covered update (:func:`clip_update`); returns how many updates
        had norm at most the clipping norm (left unscaled)."""
        current = [self._global[k].numpy() for k in self._covered]
        unclipped = 0
        for reply in valid:
            record = reply.content["arrays"]
            update = [np.subtract(record[k].numpy(), c) for k, c in zip(self._covered, current,
                                                                         strict=True)]
            unclipped += not clip_update(update, clipping_norm)
            reply.content["arrays"] = ArrayRecord({
                k: Array(np.asarray(c + u)) for k, c, u in zip(self._covered, current, update,
                                                               strict=True)})
        return unclipped

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.parameter_names is None:
            raise RuntimeError("the DP wrapper was built without the model's parameter names; "
                               "pass the model to fedsim.server.factory.make_strategy")
        replies = list(replies)
        valid = [r for r in replies if not r.has_error()]
        denominator = self._denominator(server_round, len(valid))
        if denominator is None:
            return None, None
        self._split(valid)
        clipping_norm = self.clipping_norm  # the norm this round's updates are clipped to
        with numpy_global_seed(self.seed, "dp-noise", server_round):
            unclipped = self._clip(valid, clipping_norm)
            if valid:
                aggregated, metrics = self.strategy.aggregate_train(server_round, valid)
            else:  # a Poisson round nobody answered: the global model plus the noise alone
                aggregated, metrics = ArrayRecord(dict(self._global.items())), None
            if aggregated is None:
                return None, metrics
            if self.sampling == "poisson" and valid:
                aggregated = self._fixed_denominator(aggregated, len(valid))
            aggregated = self._add_noise(aggregated, clipping_norm, denominator)
            if self.fewer_replies and self.fewer_replies[-1]["round"] == server_round:
                self.fewer_replies[-1]["noise_stddev"] = self.noise_stddev
            if self.kind == "adaptive":
                self._adapt(unclipped, denominator)
        return aggregated, metrics

    def _fixed_denominator(self, aggregated: ArrayRecord, replies: int) -> ArrayRecord:
        """The mean over ``replies`` turned into the sum over the fixed m (Poisson)."""
        scale = replies / self.num_sampled_clients
        out = dict(aggregated.items())
        for k in self._covered:
            g = self._global[k].numpy()
            out[k] = Array(np.asarray(g + (aggregated[k].numpy() - g) * scale, dtype=g.dtype))
        return ArrayRecord(out)

    def _add_noise(self, aggregated: ArrayRecord, clipping_norm: float,
                   denominator: int) -> ArrayRecord:
        """Gaussian noise of std σ·C/D on the covered arrays (Flower's helper)."""
        noisy = [aggregated[k].numpy() for k in self._covered]
        self.noise_stddev = float(self.noise_multiplier * clipping_norm / denominator)
        add_gaussian_noise_inplace(noisy, self.noise_stddev)
        self.noised_rounds += 1
        self.noised.update(self._covered)
        out = dict(zip(self._covered, noisy, strict=True))
        return ArrayRecord({k: Array(np.asarray(out[k])) if k in out else aggregated[k]
                            for k in aggregated})

    def _adapt(self, unclipped: int, denominator: int) -> None:
        """Adaptive clipping's step from the noised unclipped count (Andrew et al. 2021)."""
        noisy = float(np.random.normal(unclipped, self.clipped_count_stddev))
        self.unclipped_fraction = noisy / denominator
        self.clipping_norm = geometric_update(self.clipping_norm, self.unclipped_fraction,
                                              self.target_unclipped, self.clip_norm_lr)

    # -- the report -----------------------------------------------------------------
    def dp_report(self) -> dict:
        """What DP covered in this run (``summary.json`` ``dp``)."""
        return {
            "kind": self.kind,
            "noise_multiplier": self.requested_noise_multiplier,
            "effective_noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "noise_stddev": self.noise_stddev,
            "num_sampled_clients": self.num_sampled_clients,
            "sampling": self.sampling,
            "covers": COVERS,
            "noised_arrays": sorted(self.noised),
            "excluded_arrays": sorted(self.excluded),
            "excluded_note": "uploaded and aggregated without clipping or noise: outside the "
                             "DP guarantee (any such array makes epsilon null)",
            "local_arrays": sorted(self.local),
            "local_note": "kept on the clients, never uploaded",
            "client_weights": "uniform" if self.strategy.uniform_weights
            else "as the wrapped strategy weighs them",
            "fewer_replies": self.fewer_replies_report(),
            "privacy_spent": self.privacy_spent(),
            "max_epsilon": self.max_epsilon or None,
            "calibrated_for": self.calibrated_for,
            "stopped": self.stopped,
        }

    def fewer_replies_report(self) -> dict:
        if self.sampling == "poisson":
            return {"policy": None, "rounds": 0,
                    "note": "Poisson sampling divides by the fixed clients_per_round: fewer "
                            "replies never weaken the noise"}
        return {"policy": self.on_fewer_replies, "rounds": len(self.fewer_replies),
                "by_round": list(self.fewer_replies)}

    def stop_before_round(self, server_round: int) -> None:
        """Raise PrivacyBudgetSpent if this round would take ε above ``max_epsilon``."""
        if not self.max_epsilon:
            return
        eps = epsilon(self.requested_noise_multiplier, self.accounting(),
                      self.noised_rounds + 1, self.delta).value
        if eps > self.max_epsilon:
            self.stopped = (f"round {server_round} would spend ε = {eps:.3g} > "
                            f"server.dp.max_epsilon = {self.max_epsilon:g}")
            raise PrivacyBudgetSpent(self.stopped, round=server_round)

    def no_epsilon_why(self) -> str | None:
        """Why no ε holds for this run so far (None: the accountant's ε is this run's)."""
        if self.why_not is not None:
            return self.why_not
        if (reason := unnoised_why(self.excluded)) is not None:
            return reason
        voided = [r["round"] for r in self.fewer_replies]
        if self.on_fewer_replies == "void" and voided:
            return (f"server.dp.on_fewer_replies = 'void': {len(voided)} round(s) (first: "
                    f"{voided[0]}) averaged fewer replies than the {self.num_sampled_clients} "
                    "the noise was calibrated for, so their noise was weaker than accounted")
        return None

    def privacy_spent(self) -> dict:
        """The (ε, δ) of the released rounds so far, for the sampling that ran (``epsilon``
        None: no noise, or a reason in ``why_not``)."""
        spent = epsilon(self.requested_noise_multiplier, self.accounting(), self.noised_rounds,
                        self.delta)
        out = {**spent.as_dict(), "rounds": spent.steps, "unit": "client",
               "accountant": ACCOUNTANT}
        del out["steps"]  # called rounds here
        out["covers"] = ("the noised arrays only, not excluded arrays or the metrics "
                         "clients report in the clear")
        for key in ("epsilon", "rdp", "pld"):
            if out[key] is not None and not math.isfinite(out[key]):
                out[key] = None
        out["why_not"] = self.no_epsilon_why()
        if out["why_not"] is not None:  # the numbers stay, for reference: no ε of this run
            out["epsilon"] = None
        return out

    def fedsim_summary(self) -> dict:
        return {"dp": self.dp_report()}


class ParameterDPFixedClipping(_ParametersOnly, DifferentialPrivacyServerSideFixedClipping):
    """Server-side fixed clipping on the model's float parameters only (module docstring)."""

    def __init__(self, strategy: Strategy, noise_multiplier: float, clipping_norm: float,
                 num_sampled_clients: int, parameter_names: list[str] | None, seed: int,
                 population: int | None = None, delta: float = 1e-5, max_epsilon: float = 0.0,
                 calibrated_for: dict | None = None, sampling: str = "fixed_size",
                 on_fewer_replies: str = "scale_noise") -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self._setup(strategy, parameter_names, seed, "fixed", noise_multiplier, sampling,
                    population or num_sampled_clients, delta, max_epsilon, on_fewer_replies,
                    calibrated_for)


class ParameterDPAdaptiveClipping(_ParametersOnly, DifferentialPrivacyServerSideAdaptiveClipping):
    """Server-side adaptive clipping on the model's float parameters only, updating the norm
    by the unclipped fraction (module docstring)."""

    def __init__(self, strategy: Strategy, noise_multiplier: float, num_sampled_clients: int,
                 initial_clipping_norm: float, target_clipped_quantile: float,
                 clip_norm_lr: float, clipped_count_stddev: float | None,
                 parameter_names: list[str] | None, seed: int, population: int | None = None,
                 delta: float = 1e-5, max_epsilon: float = 0.0,
                 calibrated_for: dict | None = None, sampling: str = "fixed_size",
                 on_fewer_replies: str = "scale_noise") -> None:
        super().__init__(strategy, noise_multiplier, num_sampled_clients, initial_clipping_norm,
                         target_clipped_quantile, clip_norm_lr, clipped_count_stddev)
        self._setup(strategy, parameter_names, seed, "adaptive", noise_multiplier, sampling,
                    population or num_sampled_clients, delta, max_epsilon, on_fewer_replies,
                    calibrated_for, target_clipped_quantile)


def accounting(scenario: Scenario) -> Sampling:
    """The sampling ``[server.dp]`` runs, as the accountant analyses it."""
    m, n = scenario.server.clients_per_round, scenario.num_participating
    if scenario.server.dp.sampling == "poisson":
        return Sampling.poisson(m / n)
    return Sampling.fixed_size(m, n)


def calibration(scenario: Scenario) -> dict | None:
    """``server.dp.target_epsilon`` → ``{noise_multiplier, target_epsilon, rounds, delta,
    sampling, sampling_rate, relation}`` for the planned ``server.rounds`` under the sampling
    that runs (None when no target is set)."""
    cfg = scenario.server.dp
    if cfg.kind == "none" or not cfg.target_epsilon:
        return None
    sampling, rounds = accounting(scenario), scenario.server.rounds
    try:
        sigma = noise_for_epsilon(cfg.target_epsilon, sampling, rounds, cfg.delta)
    except ValueError as exc:
        raise ScenarioError(f"server.dp.target_epsilon = {cfg.target_epsilon!r}: {exc}") from None
    return {"noise_multiplier": sigma, "target_epsilon": cfg.target_epsilon, "rounds": rounds,
            "delta": cfg.delta, "sampling": sampling.kind, "sampling_rate": sampling.rate,
            "relation": sampling.relation}


def no_epsilon_before_run(scenario: Scenario) -> str | None:
    """Why no ε will be reported, as far as the scenario tells before a run."""
    cls = strategy_class(scenario.server.strategy)
    return why_not(cls) or predicted_unnoised(cls, has_statistics(scenario.model.norm))


def start_lines(scenario: Scenario) -> list[str]:
    """What a DP run says before it starts: a calibrated σ, or a ``warning:`` that no ε holds."""
    if scenario.server.dp.kind == "none":
        return []
    lines = []
    if (cal := calibration(scenario)) is not None:
        lines.append(f"DP: noise_multiplier = {cal['noise_multiplier']:.4g}, calibrated for "
                     f"ε = {cal['target_epsilon']:g} at δ = {cal['delta']:g} after "
                     f"{cal['rounds']} rounds ({cal['sampling']} sampling, rate "
                     f"{cal['sampling_rate']:.3g}, {cal['relation']})")
    if (reason := no_epsilon_before_run(scenario)) is not None:
        lines.append(f"warning: server.dp: no ε is reported (dp.privacy_spent.epsilon = null): "
                     f"{reason}")
    return lines


def wrap_dp(strategy: Strategy, scenario: Scenario, model: nn.Module | None) -> Strategy:
    """Wrap ``strategy`` as ``[server.dp]`` asks; bad DP settings are a ScenarioError."""
    cfg = scenario.server.dp
    if cfg.sampling == "poisson" and (why := poisson_refusal(strategy)) is not None:
        raise ScenarioError(why)
    names = [n for n, _ in model.named_parameters()] if model is not None else None
    m = scenario.server.clients_per_round
    cal = calibration(scenario)
    sigma = cfg.fixed_noise_multiplier if cal is None else cal["noise_multiplier"]
    calibrated_for = None if cal is None else {k: v for k, v in cal.items()
                                               if k != "noise_multiplier"}
    common = dict(population=scenario.num_participating, delta=cfg.delta,
                  max_epsilon=cfg.max_epsilon, calibrated_for=calibrated_for,
                  sampling=cfg.sampling, on_fewer_replies=cfg.on_fewer_replies)
    try:
        if cfg.kind == "fixed":
            return ParameterDPFixedClipping(strategy, sigma, cfg.clipping_norm, m, names,
                                            scenario.seed, **common)
        if cfg.kind == "adaptive":
            return ParameterDPAdaptiveClipping(
                strategy, sigma, m, cfg.clipping_norm, cfg.target_clipped_quantile,
                cfg.clip_norm_lr, cfg.clipped_count_stddev or None, names, scenario.seed,
                **common)
    except ValueError as exc:
        raise ScenarioError(f"[server.dp] kind = {cfg.kind!r}: {exc}") from None
    raise ScenarioError(f"server.dp.kind = {cfg.kind!r} is not a DP wrapper; use fixed or "
                        "adaptive (or none)")
