"""Budgets: rounds to a target (censored when never reached), claims on them, learning
curves with t-intervals, and the plateau check — on hand-made rounds."""

import numpy as np
import pytest
from scipy import stats

from fedsim.config import ClaimConfig
from fedsim.errors import ScenarioError
from fedsim.report.budget import (
    arms_of,
    curve_band_plot,
    mean_curve,
    plateau,
    plateau_lines,
    rounds_to_target,
)
from fedsim.report.claims import check_claims, claim_line, evaluate_claims
from fedsim.report.report import _pyplot


def rounds(*accs, every=1):
    return [{"round": i * every, "global_test_accuracy": a} for i, a in enumerate(accs)]


def test_rounds_to_target_is_the_first_evaluated_round_reaching_it():
    recs = rounds(0.1, 0.5, 0.79, 0.8, 0.7, 0.9, every=5)
    assert rounds_to_target(recs, ["global_test_accuracy"], 0.8) == (15, None)
    assert rounds_to_target(recs, ["global_test_accuracy"], 0.5) == (5, None)
    assert rounds_to_target(recs, ["global_test_accuracy"], 0.1) == (0, None)
    value, why = rounds_to_target(recs, ["global_test_accuracy"], 0.95, total=25)
    assert value is None and why == "never reached 0.95 in 25 rounds (best 0.9000)"
    nested = [{"round": 1, "client_accuracy": {"mean": 0.6}}, {"round": 2}]
    assert rounds_to_target(nested, ["client_accuracy", "mean"], 0.6) == (1, None)
    assert rounds_to_target([], ["x"], 0.5)[1] == "never reached 0.5 (no evaluated round " \
                                                  "records it)"


def row(norm, seed, curve):
    params = {"model.norm": norm, "seed": seed}
    return {"cell": f"norm-{norm}__seed-{seed}", "params": params, "summary": {},
            "rounds": curve, "server.rounds": curve[-1]["round"]}


FAST = [2, 3, 2, 1]  # rounds to 0.8 of arm a per seed
SLOW = [5, 4, 6, 4]


def race(first_at, seed, norm):
    accs = [0.1 + 0.1 * min(r, first_at - 1) for r in range(8)]  # reaches 0.8 nowhere ...
    accs[first_at] = 0.85  # ... until round first_at
    return row(norm, seed, rounds(*accs))


def learns_faster(**kw):
    return ClaimConfig(name="GN learns faster", metric="rounds_to_accuracy", target=0.8,
                       a={"model.norm": "gn"}, b={"model.norm": "bn"}, expect="a < b", **kw)


def test_a_rounds_to_accuracy_claim_tests_rounds_per_seed():
    rows = [race(r, s, "gn") for s, r in enumerate(FAST)] + \
           [race(r, s, "bn") for s, r in enumerate(SLOW)]
    (r,) = evaluate_claims([learns_faster()], rows)
    ref = stats.ttest_rel(FAST, SLOW)
    assert [(p["a_value"], p["b_value"]) for p in r["pairs"]] == list(zip(FAST, SLOW))
    assert r["diff_mean"] == pytest.approx(np.mean(np.subtract(FAST, SLOW)))
    assert r["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert r["verdict"] == "supported" and r["censored"] == []
    assert (r["target"], r["target_metric"]) == (0.8, "final.global_test_accuracy")


def test_a_run_that_never_reaches_the_target_is_censored_not_a_number():
    rows = [race(r, s, "gn") for s, r in enumerate(FAST)] + \
           [race(r, s, "bn") for s, r in enumerate(SLOW[:3])] + \
           [row("bn", 3, rounds(0.1, 0.3, 0.5, 0.6))]  # seed 3 of b: never 0.8 in 3 rounds
    (r,) = evaluate_claims([learns_faster()], rows)
    last = r["pairs"][-1]
    assert last["b_value"] is None and last["b_censored"] == "never reached 0.8 in 3 rounds " \
                                                             "(best 0.6000)"
    assert "diff" not in last and r["censored"] == [
        "norm-bn__seed-3 (never reached 0.8 in 3 rounds (best 0.6000))"]
    assert r["verdict"] == "inconclusive" and r["p_value"] is None and r["diff_mean"] is None
    assert r["reason"].startswith("1 cell(s) never reached final.global_test_accuracy ≥ 0.8 "
                                  "(censored: norm-bn__seed-3")
    assert "not tested: 1 cell(s) never reached" in claim_line(r)


@pytest.mark.parametrize(("kw", "pattern"), [
    (dict(metric="rounds_to_accuracy"), r"target = 0.0 is out of range; rounds_to_accuracy"),
    (dict(metric="final.global_test_accuracy", target=0.8), "target = 0.8 is read only by"),
    (dict(metric="rounds_to_accuracy", target=0.8, at="matched_accuracy"), "drop at"),
])
def test_bad_budget_claims(kw, pattern):
    with pytest.raises(ScenarioError, match=pattern):
        ClaimConfig(name="x", a={"model.norm": "gn"}, b={"model.norm": "bn"}, **kw)


def test_the_target_metric_must_be_a_per_round_accuracy():
    class Cell:
        name, params, scenario = "c", {"model.norm": "gn"}, None

    base = type("Base", (), {"sweep": type("S", (), {"grid": {"model.norm": ["gn", "bn"]}})(),
                             "claims": (learns_faster(target_metric="final.global_test_loss"),)})
    with pytest.raises(ScenarioError, match=r"claims\[0\].target_metric "
                                            "'final.global_test_loss' is not an accuracy"):
        check_claims(base, [Cell()])


def test_mean_curve_is_the_mean_and_t_interval_per_round():
    curves = [[(0, 0.1), (5, 0.5), (10, 0.7)], [(0, 0.1), (5, 0.6), (10, 0.8)],
              [(0, 0.1), (5, 0.4)]]  # the third stopped after round 5
    out = mean_curve(curves)
    assert [(r, n) for r, _, _, _, n in out] == [(0, 3), (5, 3), (10, 2)]
    rnd, mean, lo, hi, _ = out[1]
    ref = stats.ttest_1samp([0.5, 0.6, 0.4], 0).confidence_interval(0.95)
    assert mean == pytest.approx(0.5) and (lo, hi) == pytest.approx((ref.low, ref.high))
    assert out[0][2:4] == (0.1, 0.1)  # no spread: the interval is the point


def arm(label, rounds_total, *seed_curves):
    return {"label": label, "rounds": rounds_total, "curves": list(seed_curves),
            "finals": [c[-1][1] for c in seed_curves]}


def test_the_plateau_check_reads_the_best_arms_last_quarter():
    flat = arm("gn", 20, [(0, .1), (10, .80), (15, .842), (20, .846)],
               [(0, .1), (10, .82), (15, .850), (20, .848)])  # mean 0.846 / 0.847
    rising = arm("bn", 20, [(0, .1), (10, .6), (15, .70), (20, .80)],
                 [(0, .1), (10, .6), (15, .72), (20, .78)])
    result = plateau([rising, flat])
    assert result["best_arm"] == "gn" and result["converged"] is True
    bn, gn = result["arms"]
    assert gn["window"] == [15, 20] and gn["change"] == pytest.approx(0.001)
    assert bn["change"] == pytest.approx(0.08) and bn["plateaued"] is False
    text = "\n".join(plateau_lines(result))
    assert "**Converged** by this check: the best arm (gn) changed by 0.10 points over rounds " \
           "15–20." in text
    assert "| bn | 20 | 0.7900 | 8.00 points | no |" in text
    moving = plateau([arm("gn", 20, [(10, .5), (15, .6), (20, .7)])])
    assert moving["converged"] is False
    assert "**The study did not converge**: the best arm (gn) still changed by 10.00 " \
           "points" in "\n".join(plateau_lines(moving))
    sparse = plateau([arm("gn", 10, [(0, .1), (5, .5), (10, .7)])])  # only round 10 >= 7.5
    assert sparse["converged"] is None and sparse["arms"][0]["window"] == [10]
    assert "**Not checked**" in "\n".join(plateau_lines(sparse))


def test_arms_group_rows_by_every_axis_but_the_seed(tmp_path):
    rows = [{"params": {"model.norm": n, "seed": s}, "server.rounds": 2, "acc": 0.5 + s,
             "curve": [(0, 0.1), (2, 0.5)]} for n in ("bn", "gn") for s in (0, 1)]
    arms = arms_of(rows)
    assert [a["label"] for a in arms] == ["model.norm=bn", "model.norm=gn"]
    assert arms[0]["finals"] == [0.5, 1.5] and len(arms[0]["curves"]) == 2
    png = curve_band_plot(rows, tmp_path / "c.png", panel_of=lambda r: "all",
                          line_of=lambda r: r["params"]["model.norm"], order=["gn", "bn"],
                          pyplot=_pyplot)
    assert png == tmp_path / "c.png" and png.stat().st_size > 0
    assert curve_band_plot([], tmp_path / "d.png", lambda r: "", lambda r: "", [],
                           _pyplot) is None
