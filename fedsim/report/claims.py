"""A sweep's declared claims (``[[claims]]``): checked before it runs, tested after.

A claim compares arm ``a`` with arm ``b`` (cells fixing some sweep axes) on one metric of
``summary.json``. Cells are **paired** on every other axis, seed included: each pair is a
same-seed, same-setting difference a − b. Cells sharing a seed share data, partition and
initial model, so the pairs of one seed are not independent: each seed's differences are
averaged over its settings first (:func:`fedsim.report.stats.seed_means`), and the test is a
paired t-test (two-sided) of those per-seed means, n = seeds. When axes other than seed split
the pairs into settings (a batch-size axis, say), each setting's own 95% interval over the
seeds is listed for information. Fewer than ``MIN_SEEDS`` seeds, or no spread among them,
decides nothing: the claim is ``inconclusive`` with the ``reason``.

Multiplicity: the claims of a sweep are corrected together with Holm–Bonferroni (Holm 1979)
at α = 0.05 over all m declared claims (one that cannot be tested counts, as p = 1). A
claim ranked k-th (0-based) by raw p gets its interval at level 1 − α/(m − k); that interval
excludes zero iff p < α/(m − k), Holm's threshold for its rank. The verdict is Holm's
step-down decision (adjusted p ≤ α, which also requires every lower-ranked claim rejected):
``supported`` when the difference has the expected sign, ``contradicted`` when the opposite,
else ``inconclusive`` — with, where there is an effect to size, ``seeds_needed``: the paired
seeds that would detect the observed mean difference with its observed spread at 80% power,
by a two-sided paired t-test at the claim's Holm-adjusted level
(:func:`fedsim.report.stats.seeds_needed`).

``at = "matched_accuracy"`` reads each pair at matched test accuracy: the level is the lower
of the two cells' best global test accuracies over the rounds that record the metric, and each
cell is read at the first such round reaching it. Only metrics with a per-round record can be
read there (:func:`per_round`): ``privacy.mia.<attack>.<metric>`` (``privacy.mia_by_round``,
the audited rounds) and ``final.*``/``generalization.*`` (``rounds.jsonl``, the evaluated
rounds); any other metric is refused before the sweep runs.
"""

from __future__ import annotations

import fnmatch
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import fedsim.plugins  # noqa: F401  the audits register: which one writes a privacy metric
from fedsim.config import ROUNDS_TO_ACCURACY, ClaimConfig, Scenario
from fedsim.errors import ScenarioError
from fedsim.files import save_figure
from fedsim.privacy.audits.base import summary_owner
from fedsim.report.budget import rounds_to_target
from fedsim.report.stats import holm, paired_t, seed_means, seeds_needed, t_tests
from fedsim.text import code, markdown, mathtext

ALPHA = 0.05
SEED = "seed"
#: a claim tested on fewer paired seeds decides nothing (t with 1 degree of freedom)
MIN_SEEDS = 3

_DIST = ("mean", "weighted_mean", "std", "median", "p10", "p90", "min", "max", "n")
_MIA = ("auc", "balanced_accuracy", "best_balanced_accuracy", "tpr_at_fpr_1e-2",
        "tpr_at_fpr_1e-3", "tpr_at_fpr_0")

#: the numbers a run can write to summary.json (``*`` = one name: an attack, a layer)
SUMMARY_METRICS: tuple[str, ...] = (
    "final.round", "final.global_test_accuracy", "final.global_test_loss",
    "final.validation_accuracy", "final.validation_loss",
    *(f"final.{k}.{d}" for k in ("client_accuracy", "client_train_accuracy",
                                 "personalized_accuracy", "personalized_holdout_accuracy",
                                 "own_model_accuracy")
      for d in _DIST),
    "final.hybrid_alpha_mean", "final.hessian_max_eig", "final.sharpness",
    "final.global_test_perplexity", *(f"final.client_perplexity.{d}" for d in _DIST),
    "final.personalized_participation_gap",
    "generalization.out_of_sample_gap", "generalization.participation_gap",
    *(f"generalization.holdout_accuracy.{d}" for d in _DIST),
    "timing.seconds", "timing.train_seconds", "timing.client_updates",
    "timing.client_updates_per_s", "failures", "hybrid_alpha.*",
    *(f"privacy.mia.*.{m}" for m in _MIA),
    *(f"privacy.client_mia.{k}.{d}" for k in ("auc", "global_model_auc") for d in _DIST),
    *(f"privacy.client_membership.{m}" for m in _MIA),
    "privacy.membership_epsilon.*.epsilon_if_independent",
    *(f"privacy.canary_audit.{view}.{part}" for view in ("all_iterates", "final_model")
      for part in ("lower_bound.epsilon_lower_bound", "estimate.epsilon_estimate")),
    "privacy.canary_audit.canary_epsilon",
    "privacy.sample_canary_audit.lower_bound.epsilon_lower_bound",
    *(f"privacy.leakage.data_mean_recovery.{k}"
      for k in ("abs_error", "relative_error", "baseline_abs_error")),
    *(f"privacy.inversion.{k}" for k in ("psnr_db", "ssim", "mse", "label_accuracy",
                                         "objective")),
    *(f"privacy.exposure.{where}.{k}" for where in ("global", "upload") for k in ("mean", "max")),
    "dp.privacy_spent.epsilon", "dp.privacy_spent.rdp", "dp.privacy_spent.pld",
    "dp.noise_multiplier", "dp.effective_noise_multiplier", "dp.clipping_norm",
    "dp.noise_stddev", "dp.fewer_replies.rounds",
)

#: metric prefix -> (does this cell measure it?, how to turn it on); ``privacy.<key>``: the
#: audit that writes ``<key>`` says (:func:`_need`)
_NEEDS: dict[str, tuple[Callable[[Scenario], bool], str]] = {
    "final.validation_": (lambda s: s.data.validation_fraction > 0,
                          "data.validation_fraction = 0.1"),
    "dp.": (lambda s: s.server.dp.kind != "none", 'server.dp.kind = "fixed"'),
    "hybrid_alpha.": (lambda s: s.model.norm == "hybrid", 'model.norm = "hybrid"'),
    "final.hybrid_alpha_mean": (lambda s: s.model.norm == "hybrid", 'model.norm = "hybrid"'),
    "final.hessian_max_eig": (lambda s: s.output.sharpness, "output.sharpness = true"),
    "final.sharpness": (lambda s: s.output.sharpness, "output.sharpness = true"),
}


def _need(metric: str) -> tuple[Callable[[Scenario], bool], str] | None:
    """(does a cell measure ``metric``?, how to turn it on), or None when every run does. A
    ``privacy.<key>`` metric is measured where the registered audit writing ``<key>`` runs."""
    parts = metric.split(".")
    owner = summary_owner(parts[1]) if parts[0] == "privacy" and len(parts) > 1 else None
    if owner is not None:
        extra = owner.summary[parts[1]]
        return ((lambda s: owner.name in s.privacy.audits),
                f'privacy.audits = ["{owner.name}"]' + (f" {extra}" if extra else ""))
    return next((need for prefix, need in _NEEDS.items() if metric.startswith(prefix)), None)


def known_metric(metric: str) -> bool:
    return any(fnmatch.fnmatchcase(metric, p) and metric.count(".") == p.count(".")
               for p in SUMMARY_METRICS)


def per_round(metric: str) -> tuple[str, list[str]] | None:
    """Where ``metric`` is recorded per round: ``("mia", [attack, key])`` in
    ``privacy.mia_by_round``, ``("rounds", path)`` in ``rounds.jsonl``, or None."""
    parts = metric.split(".")
    if parts[:2] == ["privacy", "mia"]:
        return "mia", parts[2:]
    if parts[0] == "final" and metric != "final.round":
        return "rounds", parts[1:]
    if parts[0] == "generalization":
        return "rounds", parts
    return None


def check_claims(base: Scenario, cells: Sequence[Any]) -> None:
    """Refuse, before anything runs, claims naming a non-axis key, a value the axis lacks, a
    metric no run writes (or these cells do not measure), or a matched-accuracy read of a
    metric without a per-round record. ``cells`` have ``params`` and ``scenario``."""
    grid = base.sweep.grid
    for i, claim in enumerate(base.claims):
        k = f"claims[{i}]"
        for arm in ("a", "b"):
            for key, value in getattr(claim, arm).items():
                if key not in grid:
                    raise ScenarioError(
                        f"{k}.{arm}: {key!r} is not a sweep axis (axes: {', '.join(grid)}); "
                        f"add it to [sweep] or fix the claim")
                if not any(same_value(value, v) for v in grid[key]):
                    alike = [v for v in grid[key] if v == value]
                    why = (f" (the axis holds {alike[0]!r}, {_kind(alike[0])}; {value!r} is "
                           f"{_kind(value)}: write {key} = {_toml(alike[0])})" if alike else "")
                    raise ScenarioError(
                        f"{k}.{arm}: {key} = {value!r} is not among the axis values "
                        f"{grid[key]}{why}; add it to sweep.{key} or fix the claim")
        for field, metric, arm in (("metric", claim.metric, claim.a),
                                   ("metric_b", metric_of_b(claim), claim.b)):
            _check_metric(f"{k}.{field}", metric, claim.at, arm, cells, claim.target_metric)


def same_value(a: Any, b: Any) -> bool:
    """Equal and of the same type, lists element by element: a claim's ``seed = true`` is not
    the axis value ``1`` (though ``True == 1`` in Python), nor is ``1`` the value ``1.0``."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}.get(
        type(value), f"a {type(value).__name__}")


def _toml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else json.dumps(value)


def metric_of_b(claim: ClaimConfig) -> str:
    """The metric read from arm b: ``metric_b`` when set, else ``metric``."""
    return claim.metric_b or claim.metric


def check_claim_metrics(scenario: Scenario) -> None:
    """The part of :func:`check_claims` that needs no sweep: every claim's metrics are numbers
    a run writes (and, read at matched accuracy, have a per-round record). ``fedsim run``
    checks this on a file with claims, though only ``fedsim sweep`` tests them."""
    for i, claim in enumerate(scenario.claims):
        for field, metric in (("metric", claim.metric), ("metric_b", metric_of_b(claim))):
            _check_metric(f"claims[{i}].{field}", metric, claim.at, {}, (),
                          claim.target_metric)


def _check_metric(where: str, metric: str, at: str, arm: dict, cells: Sequence[Any],
                  target_metric: str = "") -> None:
    if metric == ROUNDS_TO_ACCURACY:  # the number is read from the target metric's rounds
        where, metric = f"{where.rsplit('.', 1)[0]}.target_metric", target_metric
        path = per_round(metric) if known_metric(metric) else None
        if path is None or path[0] != "rounds" or "accuracy" not in metric.split(".")[1]:
            raise ScenarioError(
                f"{where} {metric!r} is not an accuracy recorded at every evaluated round; "
                "use final.global_test_accuracy, final.validation_accuracy or "
                "final.client_accuracy.mean")
    if not known_metric(metric):
        raise ScenarioError(
            f"{where} {metric!r} is not a number summary.json holds; use e.g. "
            "final.global_test_accuracy, final.client_accuracy.p10, "
            "generalization.participation_gap, privacy.mia.loss.auc, "
            "privacy.client_mia.auc.mean (the list: fedsim.report.claims.SUMMARY_METRICS)")
    if at == "matched_accuracy" and per_round(metric) is None:
        raise ScenarioError(
            f"{where} {metric!r} has no per-round record, so it cannot be read "
            "at matched accuracy; use at = \"final\", or a final.*, generalization.* or "
            "privacy.mia.<attack>.* metric")
    need = _need(metric)
    if need is None:
        return
    measured, fix = need
    for cell in cells:
        if _in_arm(cell.params, arm) and not measured(cell.scenario):
            raise ScenarioError(f"{where} {metric!r}: sweep cell {cell.name} does not measure "
                                f"it; set {fix}")


# --------------------------------------------------------------------------- pairing


def _in_arm(params: dict, arm: dict) -> bool:
    return all(k in params and same_value(params[k], v) for k, v in arm.items())


def _label(params: dict, drop: set[str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if k not in drop) or "all cells"


def pair_rows(claim: ClaimConfig, rows: Sequence[dict]) -> list[tuple[dict, dict]]:
    """(a row, b row) pairs that agree on every axis but the claim's keys.

    Every cell of either arm must have exactly one partner; otherwise a ScenarioError names it.
    """
    fixed = set(claim.a)

    def key(r: dict) -> str:
        return json.dumps({k: v for k, v in r["params"].items() if k not in fixed},
                          sort_keys=True, default=str)

    arms = {}
    for name in ("a", "b"):
        index: dict[str, dict] = {}
        for r in rows:
            if _in_arm(r["params"], getattr(claim, name)):
                if key(r) in index:
                    raise ScenarioError(f"claim {claim.name!r}: cells {index[key(r)]['cell']} "
                                        f"and {r['cell']} of arm {name} cannot be told apart")
                index[key(r)] = r
        arms[name] = index
    for name, other in (("a", "b"), ("b", "a")):
        for k, r in arms[name].items():
            if k not in arms[other]:
                raise ScenarioError(
                    f"claim {claim.name!r}: cell {r['cell']} of arm {name} has no partner in arm "
                    f"{other} (a finished cell with {_label(r['params'], fixed)}); finish or "
                    "add that cell")
    return [(arms["a"][k], arms["b"][k]) for k in arms["a"]]


def dotted(tree: Any, path: Sequence[str]) -> float | None:
    """The number at ``path`` in nested dicts, or None when absent or not a number."""
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    if isinstance(tree, bool) or not isinstance(tree, (int, float)):
        return None
    return float(tree)


def _series(row: dict, metric: str) -> list[tuple[int, float, float | None]]:
    """(round, global test accuracy, metric) at each round that records the metric."""
    where, path = per_round(metric) or ("", [])
    if where == "mia":
        recs = (row["summary"].get("privacy") or {}).get("mia_by_round") or []
    else:
        recs = row.get("rounds") or []
    return [(r["round"], r["global_test_accuracy"], dotted(r, path)) for r in recs
            if r.get("global_test_accuracy") is not None]


def read_pair(claim: ClaimConfig, a: dict, b: dict) -> dict:
    """The pair's values (and, at matched accuracy, the level and the rounds read)."""
    out: dict[str, Any] = {"a": a["cell"], "b": b["cell"]}
    if claim.metric == ROUNDS_TO_ACCURACY:
        _, path = per_round(claim.target_metric)
        for name, row in (("a", a), ("b", b)):
            value, censored = rounds_to_target(row.get("rounds") or [], path, claim.target,
                                               row.get("server.rounds"))
            out[f"{name}_value"] = value
            if censored:
                out[f"{name}_censored"] = censored
        return out
    if claim.at == "final":
        out["a_value"] = dotted(a["summary"], claim.metric.split("."))
        out["b_value"] = dotted(b["summary"], metric_of_b(claim).split("."))
        return out
    sa, sb = _series(a, claim.metric), _series(b, metric_of_b(claim))
    if not sa or not sb:
        out["a_value"] = out["b_value"] = None
        return out
    level = min(max(acc for _, acc, _ in sa), max(acc for _, acc, _ in sb))
    out["level"] = level
    for name, series in (("a", sa), ("b", sb)):
        rnd, _, value = next(x for x in series if x[1] >= level)
        out[f"{name}_round"] = rnd
        out[f"{name}_value"] = value
    return out


# --------------------------------------------------------------------------- testing


def _test(diffs: Sequence[float], level: float = 0.95) -> dict:
    t = paired_t(diffs, level)
    return {"n_pairs": t.n, "diff_mean": t.mean, "sd": t.sd, "ci_low": t.ci_low,
            "ci_high": t.ci_high, "p_value": t.p_value}


def untestable(per_seed: Sequence[float]) -> str | None:
    """Why a test of the per-seed differences decides nothing, or None when it can: fewer
    than ``MIN_SEEDS`` seeds, or no spread — every seed the same difference, up to float
    rounding (t = d/0: a p of 0 or 1 by fiat, or by rounding residue)."""
    if len(per_seed) < MIN_SEEDS:
        return (f"fewer than {MIN_SEEDS} paired seeds ({len(per_seed)}); add seeds to the "
                "sweep's seed axis")
    if np.isnan(t_tests(per_seed).p_value):
        return ("every seed gives the same difference: no spread to test it against (the "
                "arms may not differ in anything the run uses)")
    return None


def evaluate_claim(claim: ClaimConfig, rows: Sequence[dict]) -> dict:
    """One claim's pairs and its test on one difference per seed, before Holm.

    Each seed's difference is the mean over its settings (:func:`seed_means`); a seed that
    lacks a setting's pair is left out (listed in ``incomplete_seeds``), so every seed
    averages the same settings. Per-setting tests (each over the seeds) go to ``settings``.
    """
    result: dict[str, Any] = {
        "name": claim.name, "metric": claim.metric, "metric_b": metric_of_b(claim),
        "at": claim.at, "expect": claim.expect,
        "a": claim.a, "b": claim.b, "error": None, "missing": [], "pairs": [], "settings": [],
        "incomplete_seeds": [], "seed_diffs": {}, "reason": None, "censored": [],
    }
    if claim.metric == ROUNDS_TO_ACCURACY:
        result.update(target=claim.target, target_metric=claim.target_metric)
    try:
        pairs = pair_rows(claim, rows)
    except ScenarioError as exc:
        result["error"] = str(exc)
        pairs = []
    fixed = set(claim.a) | {SEED}
    by_setting: dict[str, list[float]] = defaultdict(list)
    by_seed: dict[Any, dict[str, float]] = defaultdict(dict)
    for ra, rb in pairs:
        p = read_pair(claim, ra, rb)
        p["setting"] = _label(ra["params"], fixed)
        p["seed"] = ra["params"].get(SEED)
        if "a_censored" in p or "b_censored" in p:  # a budget too short: no number to test
            result["censored"] += [f"{r['cell']} ({p[f'{side}_censored']})"
                                   for side, r in (("a", ra), ("b", rb))
                                   if f"{side}_censored" in p]
            result["pairs"].append(p)
            continue
        for side, r in (("a", ra), ("b", rb)):
            if p[f"{side}_value"] is None:
                result["missing"].append(r["cell"])
        if p["a_value"] is None or p["b_value"] is None:
            continue
        p["diff"] = p["a_value"] - p["b_value"]
        result["pairs"].append(p)
        by_setting[p["setting"]].append(p["diff"])
        by_seed[p["seed"]][p["setting"]] = p["diff"]
    if result["censored"]:  # no test: the missing numbers are the slowest ones
        by_setting.clear()
        by_seed.clear()
    settings = list(by_setting)
    complete = [s for s, d in by_seed.items() if len(d) == len(settings)]
    result["incomplete_seeds"] = [s for s in by_seed if s not in complete]
    per_seed = seed_means([[by_seed[s][k] for k in settings] for s in complete]) \
        if complete else []
    result["seed_diffs"] = {str(s): float(d) for s, d in zip(complete, per_seed)}
    result.update(_test(per_seed))
    result["n_seeds"] = result.pop("n_pairs")
    result["n_pairs"] = len(result["pairs"])
    result["n_settings"] = len(settings)
    if result["censored"]:
        result["reason"] = (
            f"{len(result['censored'])} cell(s) never reached {claim.target_metric} ≥ "
            f"{claim.target:g} (censored: {'; '.join(result['censored'][:3])}"
            f"{' ...' if len(result['censored']) > 3 else ''}); rounds to a target compare "
            "only when every cell reaches it: raise server.rounds or lower the target")
    elif result["error"] is None and result["n_seeds"]:
        result["reason"] = untestable(per_seed)
    if result["reason"] is not None:  # no test: no p, no interval
        result.update(ci_low=None, ci_high=None, p_value=None)
    result["ci95"] = [result["ci_low"], result["ci_high"]]
    if len(by_setting) > 1:
        result["settings"] = [{"setting": s, **_test(d)} for s, d in by_setting.items()]
    return result


def evaluate_claims(claims: Sequence[ClaimConfig], rows: Sequence[dict],
                    alpha: float = ALPHA) -> list[dict]:
    """Every claim's ``report.json`` entry: per-seed paired test, Holm over all claims, verdict.

    Fields: name, verdict, reason (why no test decided it, else None), diff_mean, ci_low /
    ci_high (at ``ci_level``, Holm-adjusted: the interval that decides), ci95, p_value,
    p_holm, n_seeds (the test's n), n_pairs (cells paired), n_settings, seed_diffs,
    settings, seeds_needed, and pairs/missing/incomplete_seeds/error for the record. A claim
    without a test (an error, no pairs, too few seeds, no spread) counts in Holm's m with
    no p.
    """
    results = [evaluate_claim(c, rows) for c in claims]
    adjusted, levels = holm([r["p_value"] for r in results], alpha)
    for r, claim, p_holm, level in zip(results, claims, adjusted, levels):
        per_seed = [float(v) for v in r["seed_diffs"].values()]
        t = paired_t(per_seed, level)
        tested = r["p_value"] is not None
        r.update(ci_low=t.ci_low if tested else None, ci_high=t.ci_high if tested else None,
                 ci_level=level, p_holm=p_holm)
        verdict = "inconclusive"
        if tested and p_holm is not None and p_holm <= alpha and t.mean != 0:
            expected = 1 if claim.expect == "a > b" else -1
            verdict = "supported" if (t.mean > 0) == (expected > 0) else "contradicted"
        r["verdict"] = verdict
        r["seeds_needed"] = (seeds_needed(t.mean, t.sd, 0.8, 1 - level)
                             if verdict == "inconclusive" and t.sd else None)
    return results


# --------------------------------------------------------------------------- text

#: what report.md says above its claims
CLAIMS_INTRO = (
    "Each claim compares arm a with arm b on one metric. Cells are paired on every other "
    "axis, seed included. Cells that share a seed share data, partition and initial model, "
    "so each seed's differences are averaged over its settings first and the test is a "
    "two-sided paired t-test over those per-seed means (n = seeds; per-setting intervals "
    f"below a claim are for information). Fewer than {MIN_SEEDS} seeds, or the same "
    "difference in every seed, decides nothing (inconclusive, with the reason). The claims "
    "are corrected together with Holm–Bonferroni at α = 0.05: the claim ranked k-th by p "
    "(of m) gets its interval at level 1 − α/(m − k) — the interval shown first, which "
    "decides — and a verdict is supported or contradicted only when Holm rejects (that "
    "interval then excludes zero); otherwise inconclusive, with the paired seeds that would "
    "detect the observed difference at 80% power.")


def _num(x: float | None, sign: bool = True) -> str:
    if x is None:
        return "–"
    return f"{x:+.3f}" if sign else f"{x:.3g}"


def _p(x: float | None, name: str = "p") -> str:
    """``p = 0.012``, ``p < 0.001`` (or ``Holm ...`` with ``name``)."""
    if x is None:
        return f"{name} –"
    return f"{name} < 0.001" if x < 0.001 else f"{name} = {x:.3f}"


def _excludes_zero(lo: float | None, hi: float | None) -> bool:
    return lo is not None and hi is not None and (lo > 0 or hi < 0)


def _n(r: dict) -> str:
    n = f"n = {r['n_seeds']} seed{'s' if r['n_seeds'] != 1 else ''}"
    if r.get("n_settings", 1) > 1:
        n += f" (each the mean of its {r['n_settings']} settings' pairs)"
    return n


def claim_line(r: dict) -> str:
    """One claim as one line of report.md: the verdict beside the interval that decided it
    (at the Holm-adjusted level), then the 95% one for reference. Its name and any user text
    are escaped: a name can add no heading, table, tag or line (:mod:`fedsim.text`)."""
    head = f"**{markdown(r['name'])}** — {r['verdict']}"
    if r["error"]:
        return f"{head}: not evaluated: {markdown(r['error'])}"
    if r["n_pairs"] == 0:
        return f"{head}: no pair of finished cells records {code(r['metric'])}"
    text = f"{head}: a−b = {_num(r['diff_mean'])}"
    if r.get("reason"):
        shown = [f"a−b = {_num(r['diff_mean'])}"] if r["diff_mean"] is not None else []
        shown += [_n(r)] if r["n_seeds"] else []
        text = (f"{head}: {', '.join(shown)}{'; ' if shown else ''}not tested: "
                f"{markdown(r['reason'])}")
    else:
        level = f"{100 * r['ci_level']:.1f}".removesuffix(".0")
        text += (f", {level}% CI [{_num(r['ci_low'])}, {_num(r['ci_high'])}] (the "
                 "Holm-adjusted interval, which decides the verdict)")
        lo, hi = r["ci95"]
        if abs(r["ci_level"] - 0.95) > 1e-9:
            text += f"; 95% CI [{_num(lo)}, {_num(hi)}]"
            if _excludes_zero(lo, hi) and not _excludes_zero(r["ci_low"], r["ci_high"]):
                text += (" excludes 0 but the Holm-adjusted one does not: not significant "
                         "once corrected for the sweep's other claims")
        text += f"; {_p(r['p_value'])} ({_p(r['p_holm'], 'Holm')}), {_n(r)}"
    if r["seeds_needed"] is not None:
        text += f"; ~{r['seeds_needed']} paired seeds would detect this effect at 80% power"
    return text


def claim_details(r: dict) -> list[str]:
    """Sub-bullets (Markdown, user text escaped): what is compared, per-setting intervals,
    cells missing the metric."""
    arm = lambda d: markdown(", ".join(f"{k}={v}" for k, v in d.items()))  # noqa: E731
    where = "at the final round" if r["at"] == "final" else "at matched test accuracy"
    if r["metric"] == ROUNDS_TO_ACCURACY:
        where = (f"(the first evaluated round with {code(r['target_metric'])} ≥ "
                 f"{r['target']:g}: fewer rounds = faster)")
    if r.get("metric_b", r["metric"]) != r["metric"]:  # two metrics of the same cells
        what = f"a = {code(r['metric'])}, b = {code(r['metric_b'])} {where}"
        if r["a"] or r["b"]:
            what += f"; a on {arm(r['a']) or 'all cells'}, b on {arm(r['b']) or 'all cells'}"
        lines = [f"{what}; expected {r['expect']}"]
    else:
        lines = [f"{code(r['metric'])} {where}; a = {arm(r['a'])}, b = {arm(r['b'])}; "
                 f"expected {r['expect']}"]
    for s in r["settings"]:
        ci = ("no interval" if s["ci_low"] is None
              else f"95% CI [{_num(s['ci_low'])}, {_num(s['ci_high'])}]")
        lines.append(f"{markdown(s['setting'])}: a−b = {_num(s['diff_mean'])} {ci}, "
                     f"{_p(s['p_value'])}, n = {s['n_pairs']} seeds (for information; the "
                     "verdict tests each seed's mean over the settings)")
    if r["missing"]:
        lines.append(f"no {code(r['metric'])} in: {markdown(', '.join(r['missing']))} (their "
                     "pairs are left out)")
    if r.get("incomplete_seeds"):
        seeds = markdown(", ".join(str(s) for s in r["incomplete_seeds"]))
        lines.append(f"seeds {seeds} lack a setting's pair and are left out of the test (each "
                     "seed must average the same settings)")
    return lines


# --------------------------------------------------------------------------- plot


def forest_plot(results: Sequence[dict], path, pyplot) -> Any:
    """One row per claim (its Holm-adjusted interval, black) and per setting (95%, grey),
    against the zero line. Returns ``path``, or None without any interval to draw."""
    items = []
    for r in results:
        items.append((f"{mathtext(r['name'])}\n({r['verdict']})", r["diff_mean"],
                      r["ci_low"], r["ci_high"], "black"))
        for s in r["settings"]:
            items.append((f"  {mathtext(s['setting'])}", s["diff_mean"], s["ci_low"],
                          s["ci_high"], "gray"))
    if not any(m is not None for _, m, _, _, _ in items):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.45 * len(items)))
    for y, (_, mean, lo, hi, color) in enumerate(items):
        if mean is None:
            continue
        if lo is not None:
            ax.plot([lo, hi], [y, y], color=color, lw=2.5 if color == "black" else 1.2)
        ax.plot([mean], [y], "o", color=color, ms=6 if color == "black" else 4)
    ax.axvline(0, color="tab:red", lw=1, ls="--")
    ax.set_yticks(range(len(items)), [label for label, *_ in items], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("a − b in the claim's metric — black: Holm-adjusted CI over the per-seed "
                  "means; gray: 95% CI per setting", fontsize=7)
    ax.set_title("Claims: paired differences over seeds", fontsize=9)
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=110, bbox_inches="tight")  # long claim names stay whole
    finally:
        plt.close(fig)
    return path
