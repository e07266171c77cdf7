"""Canary clients around a strategy: a client-level audit from the run itself (Andrew et al.,
ICLR 2024, "One-shot Empirical Privacy Estimation for Federated Learning").

``privacy.audits = ["canary_clients"]`` adds k = ``privacy.canary_clients.count`` canary
clients, each with its own random unit direction c_i over the model's float parameters and a
bit drawn before the run (in with probability 1/2, :mod:`fedsim.canaries`). In every round
that has real replies, each *in* canary takes part independently with probability
q = clients_per_round / participating clients and answers with the global model moved by
s·c_i: s = the round's clipping norm under ``[server.dp]`` (the wrapper clips and noises a
canary like any client), else ``privacy.canary_clients.norm`` or, when that is 0, the median
norm of the round's real updates. The canaries' replies go to the wrapped strategy (the DP
wrapper, if any) with the real ones, so they are aggregated, clipped and noised like
clients: for a canary, each round is the Poisson-subsampled Gaussian mechanism at rate q,
whatever ``server.dp.sampling`` is, and its ε is ``canary_epsilon`` (add/remove one canary).
Canaries never reach a client, nor the round records (``clients``, failures, client audits).
Out canaries are never inserted.

After each round the wrapper takes the released update Δ_t (new minus old global float
parameters) and keeps, per canary, the largest cos(Δ_t, c_i) (the server's view: every
iterate); at the end it takes cos(θ_T − θ_0, c_i) (the final model's view). Each statistic
gives Andrew et al.'s ε estimate (:func:`fedsim.privacy.canary.gaussian_estimate`) and
Steinke et al.'s one-run lower bound (:func:`fedsim.privacy.one_run.one_run_audit`), reported
in ``summary.json`` ``privacy.canary_audit`` beside the accountant's ε by the registered audit
``canary_clients`` (:class:`CanaryClientsAudit`). The wrapper's running maxima and θ_0 are
strategy state, checkpointed with the strategy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.canaries import CLIENT, included, unit_directions
from fedsim.config import CanaryClientsConfig, Scenario
from fedsim.privacy.accountant import epsilon
from fedsim.privacy.audit_epsilon import AccountantClaim
from fedsim.privacy.audits.base import STRATEGY, Audit, AuditContext, register_audit
from fedsim.privacy.canary import cosines, gaussian_estimate
from fedsim.privacy.one_run import one_run_audit
from fedsim.records import get_record
from fedsim.rng import numpy_rng
from fedsim.server.wrapping import WrappingStrategy

#: the client id canary i answers with: negative, so it can never be a real client's
CANARY_ID = -1


def _flat(record: ArrayRecord, keys: list[str]) -> np.ndarray:
    return np.concatenate([record[k].numpy().astype(np.float64).ravel() for k in keys])


class CanaryClients(WrappingStrategy):
    """Inserts canary clients' replies before ``strategy`` aggregates (module docstring)."""

    def __init__(self, strategy: Strategy, parameter_names: list[str], count: int,
                 rate: float, seed: int, norm: float = 0.0, delta: float = 1e-5,
                 confidence: float = 0.95) -> None:
        super().__init__(strategy)
        self.parameter_names = list(parameter_names)
        self.count = count
        self.rate = rate
        self.seed = seed
        self.norm = norm
        self.delta = delta
        self.confidence = confidence
        self.included = included(count, seed, CLIENT)
        self.keys: list[str] = []  # the float parameters clients upload (set by the 1st reply)
        self.initial: np.ndarray | None = None  # θ_0 over ``keys``
        self.latest: np.ndarray | None = None  # the last released θ_t over ``keys``
        self.best = np.full(count, -np.inf)  # per canary: max over rounds of cos(Δ_t, c_i)
        self.participations = np.zeros(count, dtype=np.int64)
        self.rounds = 0
        self.norms: list[float] = []  # the update norm canaries were sent with, per round
        self._global = ArrayRecord()

    # -- what the loop asks of the outermost strategy ------------------------------------
    @property
    def releases_every_round(self) -> bool:
        return bool(getattr(self.strategy, "releases_every_round", False))

    def stop_before_round(self, server_round: int) -> None:
        stop = getattr(self.strategy, "stop_before_round", None)
        if stop is not None:
            stop(server_round)

    # -- the strategy hooks ----------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [r for r in replies if not r.has_error()]
        if valid and not self.keys:
            uploaded = valid[0].content["arrays"]
            params = set(self.parameter_names)
            self.keys = [k for k in uploaded if k in params]
            self.initial = _flat(self._global, self.keys)
        canaries = self._canary_replies(server_round, valid) if valid else []
        aggregated, metrics = self.strategy.aggregate_train(server_round, [*valid, *canaries])
        if aggregated is not None and self.keys:
            self.latest = _flat(aggregated, self.keys)
            step = self.latest - _flat(self._global, self.keys)
            self.best = np.maximum(self.best, cosines(step, self._directions()))
            self.rounds += 1
        return aggregated, metrics

    # -- canaries --------------------------------------------------------------------------
    def _directions(self, indices: Iterable[int] | None = None) -> np.ndarray:
        dim = int(self.initial.size)
        chosen = range(self.count) if indices is None else list(indices)
        return unit_directions(dim, self.seed, CLIENT, list(chosen))

    def _update_norm(self, valid: list[Message]) -> float:
        clip = getattr(self.strategy, "clipping_norm", None)
        if clip is not None:  # under DP: a full-norm update, clipped like any client's
            return float(clip)
        if self.norm > 0:
            return self.norm
        start = _flat(self._global, self.keys)
        return float(np.median([np.linalg.norm(_flat(r.content["arrays"], self.keys) - start)
                                for r in valid]))

    def _canary_replies(self, server_round: int, valid: list[Message]) -> list[Message]:
        """Replies of the in canaries sampled this round, shaped like ``valid[0]``."""
        sampled = self.included & (numpy_rng(self.seed, CLIENT, "sample", server_round)
                                   .random(self.count) < self.rate)
        chosen = np.flatnonzero(sampled)
        if not chosen.size:
            return []
        self.participations[chosen] += 1
        norm = self._update_norm(valid)
        self.norms.append(norm)
        template = valid[0].content
        start = {k: self._global[k].numpy() for k in self.keys}
        sizes = [start[k].size for k in self.keys]
        out = []
        for i, direction in zip(chosen, self._directions(chosen), strict=True):
            moved = dict(zip(self.keys, np.split(direction.astype(np.float64) * norm,
                                                 np.cumsum(sizes)[:-1]), strict=True))
            arrays = {}
            for key, arr in template["arrays"].items():
                if key in moved:
                    base = start[key]
                    arrays[key] = Array(np.asarray(base + moved[key].reshape(base.shape),
                                                   dtype=base.dtype))
                elif key in self._global:
                    arrays[key] = self._global[key]
                else:  # a hook's extra (e.g. SCAFFOLD's Δc): a canary has none
                    arrays[key] = Array(np.zeros_like(arr.numpy()))
            out.append(Message(self._content(template, ArrayRecord(arrays), valid, int(i)),
                               dst_node_id=0, message_type=MessageType.TRAIN))
        return out

    @staticmethod
    def _content(template: RecordDict, arrays: ArrayRecord, valid: list[Message],
                 index: int) -> RecordDict:
        """A canary's reply: ``arrays``, each metric the mean over the real replies (so a
        weighted mean of a metric is unchanged), and the template's client record with the
        canary's id."""
        content = RecordDict()
        for name, record in template.items():
            if isinstance(record, ArrayRecord):
                content[name] = arrays
            elif isinstance(record, MetricRecord):
                content[name] = MetricRecord({
                    key: _mean_metric([get_record(r.content, name, MetricRecord)[key]
                                       for r in valid]) for key in record})
            elif isinstance(record, ConfigRecord):
                config = ConfigRecord(dict(record))
                if "client-id" in config:
                    config["client-id"] = CANARY_ID - index
                content[name] = config
        return content

    # -- the audit -------------------------------------------------------------------------
    def audit(self) -> dict:
        """``privacy.canary_audit``: estimates and lower bounds from both statistics, beside
        the run's accountant and the canaries' own mechanism."""
        out: dict = {"unit": "client", "canaries": self.count,
                     "inserted": int(self.included.sum()), "rounds": self.rounds,
                     "participations": {"total": int(self.participations.sum()),
                                        "mean_per_inserted": float(
                                            self.participations[self.included].mean())
                                        if self.included.any() else 0.0},
                     "update_norm": {"min": min(self.norms), "max": max(self.norms)}
                     if self.norms else None,
                     "confidence": self.confidence}
        spent = getattr(self.strategy, "privacy_spent", None)
        dp = spent() if callable(spent) else None
        out["accountant"] = None if dp is None else {
            "epsilon": dp["epsilon"], "delta": dp["delta"], "relation": dp["relation"],
            "from": "dp.privacy_spent.epsilon", "why_not": dp["why_not"]}
        delta = dp["delta"] if dp is not None else self.delta
        out["canary_epsilon"] = None
        if dp is not None and self.rounds:
            eps = epsilon(dp["noise_multiplier"], self.rate, self.rounds, delta).value
            out["canary_epsilon"] = eps if np.isfinite(eps) else None
        out["canary_mechanism"] = ("each in canary joins a round independently with "
                                   f"probability {self.rate:.4g} and moves the sum by at most "
                                   "the clipping norm: the Poisson-subsampled Gaussian "
                                   "mechanism, add/remove one canary")
        if not self.keys or self.rounds == 0 or self.included.all() or not self.included.any():
            out["why_null"] = "no round was released, or every canary is in (or none)"
            return out
        out["dimension"] = int(self.initial.size)
        final = self._final_cosines()
        best, bits = self.best, self.included
        out["all_iterates"] = {
            "statistic": "max over rounds of cos(Δ_t, c_i)",
            "estimate": gaussian_estimate(best[bits], float(best[~bits].mean()),
                                          float(best[~bits].std(ddof=1)), delta),
            "lower_bound": one_run_audit(best, bits, delta, self.confidence)}
        out["final_model"] = {
            "statistic": "cos(θ_T − θ_0, c_i)",
            "estimate": gaussian_estimate(final[bits], 0.0, out["dimension"] ** -0.5, delta),
            "lower_bound": one_run_audit(final, bits, delta, self.confidence)}
        return out

    def _final_cosines(self) -> np.ndarray:
        return cosines(self.latest - self.initial, self._directions())


def _mean_metric(values: list) -> object:
    """The mean of a metric's values (lists elementwise); ints stay ints where they were."""
    first = values[0]
    if isinstance(first, list):
        return [float(np.mean([v[j] for v in values])) for j in range(len(first))]
    mean = float(np.mean(values))
    return round(mean) if isinstance(first, int) else mean


def wrap_canaries(strategy: Strategy, scenario: Scenario, parameter_names: list[str]
                  ) -> Strategy:
    """``strategy`` with the canary clients ``privacy.audits`` asks for around it (none: as
    is)."""
    count = scenario.privacy.client_canaries
    if count == 0:
        return strategy
    return CanaryClients(strategy, parameter_names, count,
                         scenario.server.clients_per_round / scenario.num_participating,
                         scenario.seed, scenario.privacy.canary_clients.norm,
                         scenario.server.dp.delta, scenario.privacy.audit_confidence)


@register_audit("canary_clients")
class CanaryClientsAudit(Audit):
    """``canary_clients``: the client-level one-run audit of the canary clients around the
    run's strategy (module docstring); its captures are the wrapper's (strategy state)."""

    summary = {"canary_audit": ""}

    @classmethod
    def needs(cls, scenario: Scenario, options: CanaryClientsConfig) -> frozenset[str]:
        return frozenset({STRATEGY})

    def __init__(self, ctx: AuditContext, options: CanaryClientsConfig) -> None:
        super().__init__(ctx, options)
        wrapper = ctx.strategy
        while not isinstance(wrapper, CanaryClients):
            wrapper = wrapper.strategy  # the factory wraps canaries around DP, if any
        self.wrapper = wrapper

    def finish(self, final: ArrayRecord, accountants: Sequence[AccountantClaim]) -> dict:
        return {"canary_audit": self.wrapper.audit()}
