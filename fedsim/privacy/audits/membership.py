"""``mia``: membership inference on the global model (``[privacy.mia]``), at the final round
and every ``every`` rounds (so norms can be compared at matched accuracy as well as at
matched rounds).

The attacks come from :data:`~fedsim.privacy.attacks.base.MIA_ATTACKS` (``attacks``). Those
that need shadows get ``shadows`` shadow *federations*, trained after the run by the callable
the run layer hands in (:attr:`AuditContext.train_shadow`): the same scenario through the
in-process engine, with the same seed, since the server knows the initial model and which
clients it sampled each round (``shadow_reseed`` gives each shadow its own seed for
initialization, sampling and batch order instead), each client on its training samples
outside the pool plus a random half of its own pool (:mod:`~fedsim.privacy.audits.pool`).
Those that need a population (RMIA) score ``population`` examples of the global test set.
Under DP the final attack scores also give an audited lower bound on ε beside the
accountant's (:func:`fedsim.privacy.audit_epsilon.membership_epsilon`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedsim.config import MiaConfig, Scenario
from fedsim.errors import ScenarioError
from fedsim.privacy.attacks.base import MiaInputs, named_attacks
from fedsim.privacy.audit_epsilon import AccountantClaim, membership_epsilon
from fedsim.privacy.audits.base import (
    POPULATION,
    SHADOWS,
    Audit,
    AuditContext,
    RoundView,
    register_audit,
)
from fedsim.privacy.audits.pool import (
    MEMBERS_FROM,
    NONMEMBERS_FROM,
    MembershipPool,
    Probe,
    ShadowData,
)
from fedsim.privacy.metrics import attack_metrics, plot_roc, roc_points
from fedsim.rng import derive_seed, numpy_rng

ROC_PNG = "privacy_roc.png"
POPULATION_FROM = "the global test set (never trained on by the target or any shadow)"
#: population below this: a warning. A population-based score (RMIA's) is the fraction of
#: the population an example dominates, so it takes at most population + 1 values; below
#: 1,000 that grid is coarser than the lowest FPR reported (0.1%), ties at the top score
#: decide TPR at low FPR (digits: 360 test images moved RMIA's TPR@1% from 0.211 to 0.175),
#: and Zarifzadeh et al. use populations of thousands
POPULATION_RESOLUTION = 1000
log = logging.getLogger("fedsim")


def _needs(mia: MiaConfig) -> frozenset[str]:
    return frozenset().union(*(cls.needs for cls, _ in named_attacks(mia)))


@register_audit("mia")
class Membership(Audit):
    """Membership inference on the global model: per-round target outputs on the pool,
    shadow federations after training, one score per attack and round."""

    summary = {"mia": "", "mia_round": "", "mia_by_round": "", "mia_pool": "", "shadows": "",
               "roc_png": "",
               "membership_epsilon": "and a DP accountant ([server.dp] or [client.dp])"}

    @classmethod
    def needs(cls, scenario: Scenario, options: MiaConfig) -> frozenset[str]:
        return _needs(options)

    @classmethod
    def check_names(cls, scenario: Scenario, options: MiaConfig) -> None:
        attacks = named_attacks(options)
        shadowed = [c.name for c, _ in attacks if SHADOWS in c.needs]
        if shadowed and options.shadows < 2:
            raise ScenarioError(
                f"privacy.mia.shadows = {options.shadows} is out of range; "
                f"{' and '.join(shadowed)} need >= 2 shadows so every example has IN and OUT "
                "models")

    @classmethod
    def check(cls, ctx: AuditContext, options: MiaConfig) -> None:
        test_size = len(ctx.data.global_test()[1])
        if POPULATION in _needs(options) and options.population > test_size:
            raise ScenarioError(
                f"privacy.mia.population = {options.population} exceeds the {test_size} "
                "examples of the global test set; lower it (0: all)")

    def __init__(self, ctx: AuditContext, options: MiaConfig) -> None:
        super().__init__(ctx, options)
        scenario = ctx.scenario
        self.attacks = named_attacks(options)
        self.needs_ = _needs(options)
        total, every = scenario.server.rounds, options.every
        self.rounds = (set(range(every, total + 1, every)) if every else set()) | {total}
        self.probe = Probe(ctx.new_model().to(ctx.device), ctx.initial)
        self.pool = MembershipPool.build(ctx.data, scenario.seed)
        x, y, self.is_member = self.pool.tensors(ctx.on_device)
        self.pool_xy = (x, y)
        self.test_xy = ctx.on_device.global_test()
        self.population_xy = self._population(self.test_xy)
        self.target: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
        self.population: dict[int, np.ndarray] = {}  # round -> target's φ on the population

    def _population(self, test_xy):
        """``population`` examples of the global test set, fixed by the seed (0: all)."""
        size = self.opts.population
        x, y = test_xy
        if size == 0 or size >= len(y):
            return x, y
        rows = numpy_rng(self.ctx.scenario.seed, "privacy", "rmia-population").choice(
            len(y), size=size, replace=False)
        rows = torch.as_tensor(np.sort(rows), device=y.device)
        return x[rows], y[rows]

    # -- during training ----------------------------------------------------------------
    def observe(self, view: RoundView) -> None:
        if view.round not in self.rounds:
            return
        losses, conf = self.probe.outputs(view.arrays, *self.pool_xy)
        acc = self.probe.accuracy(view.arrays, *self.test_xy)
        self.target[view.round] = (losses, conf, acc)
        if POPULATION in self.needs_:
            self.population[view.round] = self.probe.outputs(view.arrays,
                                                             *self.population_xy)[1]

    def state(self) -> dict:
        return {"target": self.target, "population": self.population}

    def restore(self, state: dict) -> None:
        self.target = {int(k): tuple(v) for k, v in state["target"].items()}
        self.population = {int(k): v for k, v in state["population"].items()}

    # -- after training -----------------------------------------------------------------
    def finish(self, final: ArrayRecord, accountants: Sequence[AccountantClaim]) -> dict:
        shadow_conf, shadow_in, pop_conf, seconds = None, None, None, 0.0
        if SHADOWS in self.needs_:
            t0 = time.perf_counter()
            shadow_conf, shadow_in, pop_conf = self._shadows()
            seconds = time.perf_counter() - t0
        by_round, final_scores = [], {}
        for rnd in sorted(self.target):
            losses, conf, acc = self.target[rnd]
            inputs = MiaInputs(losses, conf,
                               None if shadow_conf is None else shadow_conf[rnd], shadow_in,
                               self.population.get(rnd),
                               None if pop_conf is None else pop_conf[rnd])
            scores: dict[str, np.ndarray] = {}
            for attack, options in self.attacks:
                scores.update(attack.scores(inputs, options))
            by_round.append({"round": rnd, "global_test_accuracy": acc,
                             **{k: attack_metrics(s, self.is_member) for k, s in scores.items()}})
            final_scores = scores
        curves = {}
        for name, s in final_scores.items():
            fpr, tpr = roc_points(s, self.is_member)
            curves[name] = (fpr, tpr, by_round[-1][name]["auc"])
        scenario = self.ctx.scenario
        plot_roc(curves, self.ctx.out / ROC_PNG, title=f"{scenario.name}: membership inference")
        last = by_round[-1]
        out: dict[str, Any] = {
            "mia": {k: v for k, v in last.items() if k not in ("round", "global_test_accuracy")},
            "mia_round": last["round"],
            "mia_by_round": by_round,
            "mia_pool": {
                "clients": len(self.pool.clients),
                "members": int(self.is_member.sum()),
                "nonmembers": int((~self.is_member).sum()),
                "members_from": MEMBERS_FROM,
                "nonmembers_from": NONMEMBERS_FROM,
                **(self._population_summary() if POPULATION in self.needs_ else {}),
            },
            "shadows": {"count": self.opts.shadows, "reseed": self.opts.shadow_reseed,
                        "engine": "inprocess", "seconds": seconds}
            if shadow_conf is not None else None,
            "roc_png": ROC_PNG,
        }
        for attack, options in self.attacks:  # each attack's own settings, where they apply
            for key, fields in attack.describe(options).items():
                if out.get(key) is not None:
                    out[key].update(fields)
        if accountants:
            out["membership_epsilon"] = membership_epsilon(
                final_scores, self.is_member, accountants[0],
                confidence=scenario.privacy.audit_confidence)
        return out

    def _population_summary(self) -> dict:
        size = len(self.population_xy[1])
        out = {"population": size, "population_from": POPULATION_FROM}
        if size < POPULATION_RESOLUTION:
            out["population_warning"] = (
                f"the population has {size} examples: a population-based score (RMIA's) takes "
                f"at most {size + 1} values, coarser than the 0.1% FPR reported, so ties "
                f"decide TPR at low FPR; use privacy.mia.population >= {POPULATION_RESOLUTION}"
                " (a larger global test set)")
            log.warning("warning: privacy: %s", out["population_warning"])
        return out

    def _shadows(self):
        """Train the shadow federations; their pool confidences at every audited round (and
        their population confidences, when an attack needs a population)."""
        ctx, k = self.ctx, self.opts.shadows
        if ctx.train_shadow is None:
            raise ScenarioError("privacy.mia: an attack needs shadow federations, which this "
                                "run cannot train (no shadow trainer was handed in)")
        masks = self.pool.shadow_masks(k, ctx.scenario.seed)
        shadow_in = np.concatenate([masks[c] for c in self.pool.clients], axis=1)
        conf = {rnd: np.zeros((k, len(self.is_member))) for rnd in self.target}
        pop = ({rnd: np.zeros((k, len(self.population_xy[1]))) for rnd in self.target}
               if POPULATION in self.needs_ else None)
        for i in range(k):
            shadow = ctx.scenario
            if self.opts.shadow_reseed:
                seed = derive_seed(ctx.scenario.seed, "privacy", "shadow", i) & 0x7FFFFFFF
                shadow = dataclasses.replace(ctx.scenario, seed=seed)
            data = ShadowData.for_shadow(ctx.data, self.pool, masks, i)

            def on_round(rnd: int, arrays: ArrayRecord, i: int = i) -> None:
                if rnd in conf:
                    conf[rnd][i] = self.probe.outputs(arrays, *self.pool_xy)[1]
                    if pop is not None:
                        pop[rnd][i] = self.probe.outputs(arrays, *self.population_xy)[1]

            ctx.train_shadow(shadow, data, on_round)
        return conf, shadow_in, pop
