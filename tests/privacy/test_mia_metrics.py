"""Attack metrics: hand-computed ROC cases, the Gaussian AUC formula, sklearn as reference."""

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

from fedsim.privacy.metrics import attack_metrics, plot_roc, roc_points, tpr_at_fpr

# Ranked by score: M M N M N N M N (M = member). Hand-computed ROC points:
# (0,0) (0,.25) (0,.5) (.25,.5) (.25,.75) (.5,.75) (.75,.75) (.75,1) (1,1).
MEMBERS = [0.9, 0.8, 0.6, 0.2]
NON_MEMBERS = [0.7, 0.5, 0.3, 0.1]
SCORES = np.array(MEMBERS + NON_MEMBERS)
IS_MEMBER = np.array([True] * 4 + [False] * 4)


def test_hand_case_exact_numbers():
    m = attack_metrics(SCORES, IS_MEMBER)
    assert m["auc"] == pytest.approx(12 / 16)  # member beats non-member in 12 of 16 pairs
    assert m["best_balanced_accuracy"] == pytest.approx(0.75)  # at (0, .5) and (.25, .75)
    # held out: half A = M .9 .6 / N .7 .3, half B = M .8 .2 / N .5 .1. A's best threshold
    # .9, moved halfway to .7: .8, scores B at (.5 + 1) / 2 = .75; B's best .8, halfway to
    # .5: .65, scores A at (.5 + .5) / 2 = .5; the mean of the two folds
    assert m["balanced_accuracy"] == pytest.approx(0.625)
    # 4 non-members: no threshold has an FPR of 1% or 0.1% but 0
    assert m["tpr_at_fpr_1e-2"] is None and m["tpr_at_fpr_1e-3"] is None
    assert m["null_because"]["tpr_at_fpr_1e-3"] == (
        "4 non-members: an FPR of 0.001 needs at least 1000 (below that it reads as the TPR "
        "at FPR 0)")
    assert m["tpr_at_fpr_0"] == 0.5


def test_tpr_at_low_fpr_is_reported_from_enough_non_members():
    rng = np.random.default_rng(0)
    for nonmembers, null in ((99, {"tpr_at_fpr_1e-2", "tpr_at_fpr_1e-3"}),
                             (100, {"tpr_at_fpr_1e-3"}), (1000, set())):
        scores = np.r_[rng.normal(1, 1, 50), rng.normal(0, 1, nonmembers)]
        m = attack_metrics(scores, np.arange(scores.size) < 50)
        assert set(m.get("null_because", {})) == null
        assert {k for k in ("tpr_at_fpr_1e-2", "tpr_at_fpr_1e-3") if m[k] is None} == null


def test_tpr_at_fpr_counts_points_exactly_at_the_limit():
    fpr, tpr = roc_points(SCORES, IS_MEMBER)
    # "<=": the point (.25, .75) is admitted at FPR 0.25 (LiRA's plot.py "<" would give .5).
    assert tpr_at_fpr(fpr, tpr, 0.25) == 0.75
    assert tpr_at_fpr(fpr, tpr, 0.2499) == 0.5
    assert tpr_at_fpr(fpr, tpr, 0.5) == 0.75
    assert tpr_at_fpr(fpr, tpr, 0.75) == 1.0
    assert tpr_at_fpr(fpr, tpr, 1.0) == 1.0


def test_roc_points_start_at_origin_and_increase():
    fpr, tpr = roc_points(SCORES, IS_MEMBER)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_a_tie_with_the_top_non_member_gives_zero_tpr_at_zero_fpr():
    m = attack_metrics([1.0, 1.0, 0.5, 0.0], [True, False, True, False])
    assert m["tpr_at_fpr_0"] == 0.0
    assert m["auc"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)


def test_perfect_separation_and_inverted_scores():
    perfect = attack_metrics([6, 5, 4, 3, 2, 1], [1, 1, 1, 0, 0, 0])
    assert {k: v for k, v in perfect.items() if k != "null_because"} == {
        "auc": 1.0,
        "balanced_accuracy": 1.0,  # halves' thresholds 3.5 and 3.5
        "best_balanced_accuracy": 1.0,
        "tpr_at_fpr_1e-2": None,
        "tpr_at_fpr_1e-3": None,
        "tpr_at_fpr_0": 1.0,
    }
    inverted = attack_metrics([0, 1, 2, 3], [1, 1, 0, 0])
    assert inverted["auc"] == 0.0 and inverted["tpr_at_fpr_0"] == 0.0
    assert inverted["best_balanced_accuracy"] == 0.5  # the all-or-nothing thresholds
    assert attack_metrics([1, 0], [1, 0])["balanced_accuracy"] is None  # no held-out half


@pytest.mark.parametrize("d", [0.0, 0.5, 1.0, 2.0])
def test_auc_and_low_fpr_tpr_of_two_gaussians(d):
    rng = np.random.default_rng(7)
    n = 10_000
    scores = np.concatenate([rng.normal(d, 1, n), rng.normal(0, 1, n)])
    is_member = np.arange(2 * n) < n
    m = attack_metrics(scores, is_member)
    assert m["auc"] == pytest.approx(roc_auc_score(is_member, scores), abs=1e-12)
    assert m["auc"] == pytest.approx(norm.cdf(d / np.sqrt(2)), abs=0.01)
    # TPR at FPR x of N(d,1) vs N(0,1) is 1 - Φ(Φ⁻¹(1 - x) - d); 100 negatives set the 1% point.
    assert m["tpr_at_fpr_1e-2"] == pytest.approx(norm.sf(norm.isf(0.01) - d), abs=0.03)
    best = max(norm.cdf(t) + norm.sf(t - d) for t in np.linspace(-3, 5, 2001)) / 2
    assert m["best_balanced_accuracy"] == pytest.approx(best, abs=0.01)
    assert m["balanced_accuracy"] == pytest.approx(best, abs=0.015)


@pytest.mark.parametrize(
    ("scores", "is_member"),
    [
        ([0.1, 0.2], [True, True]),  # one class only
        ([0.1, np.nan], [True, False]),
        ([0.1, 0.2, 0.3], [True, False]),
        ([0.1, 0.2], [2, 0]),
    ],
)
def test_bad_inputs_are_refused(scores, is_member):
    with pytest.raises(ValueError):
        attack_metrics(scores, is_member)


def test_plot_roc_writes_a_png(tmp_path):
    fpr, tpr = roc_points(SCORES, IS_MEMBER)
    path = plot_roc({"loss": (fpr, tpr, 0.75)}, tmp_path / "sub" / "roc.png", title="demo")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- tied scores -------------------------------------------------------------------------


def brute_force_tpr_at_fpr(scores, is_member, max_fpr):
    """Every distinct threshold t: TPR = mean(member >= t), FPR = mean(non-member >= t)."""
    s_in, s_out = scores[is_member], scores[~is_member]
    best = 0.0
    for t in np.unique(scores):
        if np.mean(s_out >= t) <= max_fpr:
            best = max(best, float(np.mean(s_in >= t)))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_tied_scores_match_a_brute_force_threshold_sweep(seed):
    rng = np.random.default_rng(seed)
    n = 1000
    is_member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    # Integer scores with many ties; members shifted up so low FPRs have something to find.
    scores = np.r_[rng.binomial(12, 0.55, n), rng.binomial(12, 0.45, n)].astype(float)
    fpr, tpr = roc_points(scores, is_member)
    m = attack_metrics(scores, is_member)
    for x in (1e-2, 5e-2, 0.1, 0.3, 1e-3, 0.0):
        expected = brute_force_tpr_at_fpr(scores, is_member, x)
        assert tpr_at_fpr(fpr, tpr, x) == pytest.approx(expected, abs=1e-12)
    assert m["tpr_at_fpr_1e-2"] == pytest.approx(brute_force_tpr_at_fpr(scores, is_member, 1e-2))
    assert m["auc"] == pytest.approx(roc_auc_score(is_member, scores), abs=1e-12)
    # One point per distinct score, plus the origin.
    assert len(fpr) == len(np.unique(scores)) + 1


def test_dropping_collinear_points_would_read_low_on_ties():
    """The default roc_curve loses the ROC point a low-FPR read needs (hence the fix)."""
    # ROC (0,0) (.01,.05) (.02,.10) (.03,.15) (1,1): sklearn drops the collinear (.02,.10).
    levels = np.array([4.0, 3.0, 2.0, 1.0])
    scores = np.r_[np.repeat(levels, [5, 5, 5, 85]), np.repeat(levels, [1, 1, 1, 97])]
    is_member = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    dropped_fpr, dropped_tpr, _ = roc_curve(is_member, scores)
    fpr, tpr = roc_points(scores, is_member)
    assert tpr_at_fpr(fpr, tpr, 0.02) == brute_force_tpr_at_fpr(scores, is_member, 0.02) == 0.1
    assert tpr_at_fpr(dropped_fpr, dropped_tpr, 0.02) == 0.05
