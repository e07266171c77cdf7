"""Declared claims on hand-made rows: pairing, pooled and per-setting tests, Holm, verdicts."""

import numpy as np
import pytest
from scipy import stats

from fedsim.config import ClaimConfig
from fedsim.errors import ScenarioError
from fedsim.report.claims import (
    claim_details,
    claim_line,
    evaluate_claims,
    known_metric,
    pair_rows,
    per_round,
)


def row(norm, seed, acc, batch=None, rounds=None, mia=None):
    params = {"model.norm": norm}
    if batch is not None:
        params["client.batch_size"] = batch
    params["seed"] = seed
    name = "__".join(f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in params.items())
    summary = {"final": {"global_test_accuracy": acc}}
    if mia is not None:
        summary["privacy"] = {"mia_by_round": mia}
    return {"cell": name, "params": params, "summary": summary, "rounds": rounds or []}


def claim(metric="final.global_test_accuracy", expect="a > b", at="final", name="GN > BN"):
    return ClaimConfig(name=name, metric=metric, a={"model.norm": "gn"},
                       b={"model.norm": "bn"}, expect=expect, at=at)


GN = [0.81, 0.79, 0.84, 0.80, 0.83]
BN = [0.78, 0.77, 0.80, 0.79, 0.78]
ROWS = [row("gn", s, a) for s, a in enumerate(GN)] + [row("bn", s, b) for s, b in enumerate(BN)]


def test_one_claim_is_a_paired_t_test_over_seeds():
    (r,) = evaluate_claims([claim()], ROWS)
    ref = stats.ttest_rel(GN, BN)
    assert r["n_pairs"] == 5 and r["p_value"] == pytest.approx(ref.pvalue)
    assert r["ci95"] == pytest.approx(list(ref.confidence_interval(0.95)))
    assert r["ci_level"] == 0.95 and r["p_holm"] == pytest.approx(ref.pvalue)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(tuple(ref.confidence_interval(0.95)))
    assert r["verdict"] == "supported" and r["seeds_needed"] is None
    (c,) = evaluate_claims([claim(expect="a < b")], ROWS)
    assert c["verdict"] == "contradicted"
    assert claim_line(r) == ("**GN > BN** — supported: a−b = +0.030, 95% CI [+0.010, +0.050] "
                             "(the Holm-adjusted interval, which decides the verdict); "
                             "p = 0.013 (Holm = 0.013), n = 5 seeds")


def test_holm_over_the_claims_of_a_sweep():
    noisy = [row("gn", s, a + e) for s, (a, e) in enumerate(zip(GN, (0.05, -0.04, 0, -0.03,
                                                                     0.04)))]
    rows = ROWS + [dict(r, params={**r["params"], "model.norm": "ln"}, cell="ln" + r["cell"])
                   for r in noisy]
    ln = ClaimConfig(name="LN > BN", a={"model.norm": "ln"}, b={"model.norm": "bn"})
    r_gn, r_ln = evaluate_claims([claim(), ln], rows)
    p_gn, p_ln = r_gn["p_value"], r_ln["p_value"]
    assert p_gn < p_ln
    assert r_gn["p_holm"] == pytest.approx(2 * p_gn)
    assert r_ln["p_holm"] == pytest.approx(max(2 * p_gn, p_ln))
    assert r_gn["ci_level"] == pytest.approx(1 - 0.05 / 2) and r_ln["ci_level"] == 0.95
    d = [g - b for g, b in zip(GN, BN)]
    assert (r_gn["ci_low"], r_gn["ci_high"]) == pytest.approx(
        tuple(stats.ttest_1samp(d, 0).confidence_interval(1 - 0.05 / 2)))
    assert r_gn["verdict"] == "supported"  # p = 0.013 <= 0.025
    assert r_ln["verdict"] == "inconclusive" and r_ln["seeds_needed"] > 5
    assert f"~{r_ln['seeds_needed']} paired seeds would detect this effect" in claim_line(r_ln)


# a − b per (seed, batch size): a per-seed component shared by the settings plus noise
CLUSTER = {0: (0.031, 0.052), 1: (-0.004, 0.020), 2: (0.043, 0.049), 3: (0.012, 0.005)}


def clustered_rows():
    rows = []
    for seed, diffs in CLUSTER.items():
        for batch, d in zip((4, 32), diffs):
            base = 0.7 + 0.01 * seed + (0.1 if batch == 32 else 0.0)
            rows += [row("gn", seed, base + d, batch=batch), row("bn", seed, base, batch=batch)]
    return rows


def test_an_arm_over_several_settings_is_one_mean_difference_per_seed():
    rows = clustered_rows()
    (r,) = evaluate_claims([claim()], rows)
    gn = {s: np.mean([x["summary"]["final"]["global_test_accuracy"] for x in rows
                      if x["params"]["seed"] == s and x["params"]["model.norm"] == "gn"])
          for s in CLUSTER}
    bn = {s: np.mean([x["summary"]["final"]["global_test_accuracy"] for x in rows
                      if x["params"]["seed"] == s and x["params"]["model.norm"] == "bn"])
          for s in CLUSTER}
    ref = stats.ttest_rel(list(gn.values()), list(bn.values()))  # on the per-seed means
    assert (r["n_seeds"], r["n_pairs"], r["n_settings"]) == (4, 8, 2)
    assert r["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert r["ci95"] == pytest.approx(list(ref.confidence_interval(0.95)), rel=1e-9)
    assert r["diff_mean"] == pytest.approx(np.mean([np.mean(d) for d in CLUSTER.values()]))
    assert r["seed_diffs"] == pytest.approx({str(s): np.mean(d) for s, d in CLUSTER.items()})
    # the 8 pairs pooled as if independent would claim far more certainty
    pooled = stats.ttest_1samp([d for ds in CLUSTER.values() for d in ds], 0).pvalue
    assert pooled < 0.05 < r["p_value"] and r["verdict"] == "inconclusive"
    assert [s["setting"] for s in r["settings"]] == ["client.batch_size=4",
                                                     "client.batch_size=32"]
    for s, j in zip(r["settings"], (0, 1)):
        per = stats.ttest_1samp([d[j] for d in CLUSTER.values()], 0)
        assert s["n_pairs"] == 4 and s["p_value"] == pytest.approx(per.pvalue, rel=1e-9)
        assert (s["ci_low"], s["ci_high"]) == pytest.approx(per.confidence_interval(0.95))
    assert "n = 4 seeds (each the mean of its 2 settings' pairs)" in claim_line(r)


def test_a_seed_missing_a_setting_is_left_out_of_the_test():
    rows = [r for r in clustered_rows() if r["cell"] != "norm-bn__batch_size-32__seed-3"]
    rows = [r for r in rows if r["cell"] != "norm-gn__batch_size-32__seed-3"]
    (r,) = evaluate_claims([claim()], rows)
    assert r["incomplete_seeds"] == [3] and r["n_seeds"] == 3 and r["n_pairs"] == 7
    ref = stats.ttest_1samp([np.mean(CLUSTER[s]) for s in (0, 1, 2)], 0)
    assert r["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert "seeds 3 lack a setting's pair" in " ".join(claim_details(r))


@pytest.mark.parametrize(("gn", "bn", "reason"), [
    ([0.9, 0.8, 0.7], [0.8, 0.7, 0.6], "every seed gives the same difference"),
    ([0.8, 0.8, 0.8], [0.8, 0.8, 0.8], "every seed gives the same difference"),
    ([0.9, 0.85], [0.8, 0.7], "fewer than 3 paired seeds (2)"),
])
def test_too_few_seeds_or_no_spread_decide_nothing(gn, bn, reason):
    """A constant difference over seeds has t = d/0 (p = 0 by fiat): no verdict from it."""
    rows = [row("gn", s, a) for s, a in enumerate(gn)] + [row("bn", s, b)
                                                          for s, b in enumerate(bn)]
    (r,) = evaluate_claims([claim()], rows)
    assert r["verdict"] == "inconclusive" and reason in r["reason"]
    assert (r["p_value"], r["p_holm"], r["ci_low"], r["ci_high"]) == (None, None, None, None)
    assert r["diff_mean"] == pytest.approx(np.mean(np.subtract(gn, bn)))
    assert f"not tested: {r['reason']}" in claim_line(r)


def test_the_report_line_says_which_interval_decided():
    """A 95% interval that excludes 0 beside an inconclusive verdict says why."""
    def copy(norm, of):
        return [dict(r, params={**r["params"], "model.norm": norm}, cell=norm + r["cell"])
                for r in ROWS if r["params"]["model.norm"] == of]
    rows = ROWS + copy("ln", "gn") + copy("in", "bn")  # LN = GN and IN = BN exactly
    four = [claim(), ClaimConfig(name="LN > BN", a={"model.norm": "ln"}, b={"model.norm": "bn"}),
            ClaimConfig(name="LN = GN", a={"model.norm": "ln"}, b={"model.norm": "gn"}),
            ClaimConfig(name="IN = BN", a={"model.norm": "in"}, b={"model.norm": "bn"})]
    r = evaluate_claims(four, rows)[0]  # p = 0.013, but four claims share Holm's α
    assert r["ci_level"] == pytest.approx(1 - 0.05 / 4) and r["p_holm"] > 0.05
    d = np.subtract(GN, BN)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(
        tuple(stats.ttest_1samp(d, 0).confidence_interval(1 - 0.05 / 4)))
    assert claim_line(r).startswith(
        "**GN > BN** — inconclusive: a−b = +0.030, 98.8% CI [-0.001, +0.061] (the "
        "Holm-adjusted interval, which decides the verdict); 95% CI [+0.010, +0.050] "
        "excludes 0 but the Holm-adjusted one does not: not significant once corrected for "
        "the sweep's other claims; p = 0.013 (Holm = 0.053), n = 5 seeds")


def test_a_cell_without_a_partner_is_an_error_naming_it():
    rows = [r for r in ROWS if r["cell"] != "norm-bn__seed-3"]
    with pytest.raises(ScenarioError, match="cell norm-gn__seed-3 of arm a has no partner in "
                                            "arm b \\(a finished cell with seed=3\\)"):
        pair_rows(claim(), rows)
    (r,) = evaluate_claims([claim()], rows)
    assert r["verdict"] == "inconclusive" and "norm-gn__seed-3" in r["error"]
    assert "not evaluated" in claim_line(r)


def test_a_metric_missing_in_a_finished_cell_is_reported_not_fatal():
    rows = [dict(r) for r in ROWS]
    rows[0]["summary"] = {"final": {}}
    (r,) = evaluate_claims([claim()], rows)
    assert r["missing"] == ["norm-gn__seed-0"] and r["n_pairs"] == 4


def test_matched_accuracy_reads_each_pair_at_its_common_level():
    def mia(*points):
        return [{"round": i + 1, "global_test_accuracy": acc, "loss": {"auc": auc}}
                for i, (acc, auc) in enumerate(points)]
    rows = [row("gn", 0, 0.9, mia=mia((0.5, 0.51), (0.7, 0.52), (0.9, 0.60))),
            row("bn", 0, 0.75, mia=mia((0.6, 0.50), (0.75, 0.53), (0.72, 0.54)))]
    (r,) = evaluate_claims([claim("privacy.mia.loss.auc", "a < b", "matched_accuracy")], rows)
    (p,) = r["pairs"]
    assert p["level"] == 0.75 and (p["a_round"], p["b_round"]) == (3, 2)
    assert (p["a_value"], p["b_value"]) == (0.60, 0.53)
    assert r["n_pairs"] == 1 and r["p_value"] is None and r["verdict"] == "inconclusive"


def test_metric_names():
    for m in ("final.global_test_accuracy", "final.client_accuracy.p10",
              "generalization.participation_gap", "privacy.mia.loss.auc",
              "privacy.mia.lira_online.tpr_at_fpr_1e-3", "privacy.client_mia.auc.mean"):
        assert known_metric(m)
    for m in ("final.global_test_acc", "privacy.mia.auc", "privacy.mia.loss.auc.x"):
        assert not known_metric(m)
    assert per_round("privacy.mia.loss.auc") == ("mia", ["loss", "auc"])
    assert per_round("final.client_accuracy.p10") == ("rounds", ["client_accuracy", "p10"])
    assert per_round("generalization.participation_gap") == (
        "rounds", ["generalization", "participation_gap"])
    assert per_round("privacy.inversion.psnr_db") is None


def test_metric_b_compares_two_measurements_of_the_same_cells():
    """a = b = {} with metric_b: every cell is paired with itself, a's metric against b's."""
    rows = [{"cell": f"seed-{s}", "params": {"seed": s},
             "summary": {"privacy": {"mia": {"lira_offline": {"tpr_at_fpr_1e-2": 0.03 + e},
                                             "loss": {"tpr_at_fpr_1e-2": 0.01}}}}}
            for s, e in enumerate([0.0, 0.01, 0.02, 0.005])]
    c = ClaimConfig(name="LiRA beats loss", metric="privacy.mia.lira_offline.tpr_at_fpr_1e-2",
                    metric_b="privacy.mia.loss.tpr_at_fpr_1e-2")
    (r,) = evaluate_claims([c], rows)
    diffs = [0.02, 0.03, 0.04, 0.025]
    assert [p["a"] for p in r["pairs"]] == [p["b"] for p in r["pairs"]]
    assert r["n_pairs"] == 4 and r["diff_mean"] == pytest.approx(np.mean(diffs))
    assert r["p_value"] == pytest.approx(stats.ttest_1samp(diffs, 0).pvalue)
    assert r["verdict"] == "supported"
    assert "b = `privacy.mia.loss.tpr_at_fpr_1e-2`" in claim_details(r)[0]


def test_same_arms_need_a_second_metric():
    with pytest.raises(ScenarioError, match="metric_b"):
        ClaimConfig(name="x", a={}, b={})
    with pytest.raises(ScenarioError, match="metric_b"):
        ClaimConfig(name="x", a={"seed": 0}, b={"seed": 0})


def _claim_scenario(tmp_path, arm: str, grid: str = "seed = [0, 1]"):
    from fedsim.config import load_scenario

    path = tmp_path / "c.toml"
    path.write_text(f'[sweep]\nmodel.norm = ["bn", "gn"]\n{grid}\n[[claims]]\nname = "x"\n'
                    f'metric_b = "final.client_accuracy.mean"\na = {arm}\nb = {arm}\n')
    return load_scenario(path)


@pytest.mark.parametrize(("arm", "grid", "pattern"), [
    ("{ seed = true }", "seed = [0, 1]", r"claims\[0\].a: seed = True is not among the axis "
     r"values \[0, 1\] \(the axis holds 1, an integer; True is a boolean: write seed = 1\)"),
    ("{ seed = 0 }", "seed = [false, true]", r"seed = 0 is not among the axis values "
     r"\[False, True\] \(the axis holds False, a boolean; 0 is an integer: write seed = false"),
    ("{ seed = 1.0 }", "seed = [0, 1]", r"seed = 1.0 is not among .* \(the axis holds 1, an "
     r"integer; 1.0 is a float: write seed = 1\)"),
])
def test_claim_arm_values_must_match_the_axis_type_exactly(tmp_path, arm, grid, pattern):
    """``True == 1`` in Python: the arm ``seed = true`` once paired seed 1 with seed 0."""
    from fedsim.report.claims import check_claims

    scenario = _claim_scenario(tmp_path, arm, grid)
    with pytest.raises(ScenarioError, match=pattern):
        check_claims(scenario, [])


def test_pairing_tells_true_from_one():
    rows = [{"cell": f"{n}-{s}", "params": {"model.norm": n, "seed": s},
             "summary": {}, "rounds": []} for n in ("bn", "gn") for s in (True, 1)]
    c = ClaimConfig(name="x", a={"model.norm": "gn", "seed": 1},
                    b={"model.norm": "bn", "seed": 1})
    assert [(a["cell"], b["cell"]) for a, b in pair_rows(c, rows)] == [("gn-1", "bn-1")]
