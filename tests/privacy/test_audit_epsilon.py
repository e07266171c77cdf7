"""Membership ε: Clopper–Pearson bounds by hand, the perfect attack's closed form,
monotonicity, chance attacks, joint confidence, and the wiring beside the accountant's ε."""

import math

import numpy as np
import pytest
from scipy.stats import beta

from fedsim.privacy.audit_epsilon import (
    AccountantClaim,
    accountant_claims,
    cp_lower,
    cp_upper,
    empirical_epsilon,
    membership_epsilon,
)


def labels(n_members: int, n_nonmembers: int) -> np.ndarray:
    return np.r_[np.ones(n_members, bool), np.zeros(n_nonmembers, bool)]


def test_clopper_pearson_bounds_by_hand():
    # Lower: Beta(k, n - k + 1) quantile 1 - c; upper: Beta(k + 1, n - k) quantile c.
    assert cp_lower(7, 10, 0.95) == pytest.approx(beta.ppf(0.05, 7, 4))
    assert cp_upper(2, 10, 0.95) == pytest.approx(beta.ppf(0.95, 3, 8))
    assert cp_lower(0, 10, 0.95) == 0.0 and cp_upper(10, 10, 0.95) == 1.0
    # Closed forms at the edges: (1 - c)^(1/n) and 1 - (1 - c)^(1/n).
    assert cp_lower(10, 10, 0.95) == pytest.approx(0.05 ** 0.1)
    assert cp_upper(0, 10, 0.95) == pytest.approx(1 - 0.05 ** 0.1)


def test_small_counts_by_hand():
    # Members 3, 3, 3, 2, 1; non-members 2, 1, 1, 1, 0. Thresholds t = 0, 1, 2, 3:
    # (TP, FP) = (5, 5), (5, 4), (4, 1), (3, 0).
    scores = np.array([3, 3, 3, 2, 1, 2, 1, 1, 1, 0], dtype=float)
    is_member = labels(5, 5)
    delta, c = 1e-5, 0.9
    each = 1 - (1 - c) / 8  # Bonferroni over 2 bounds at each of the 4 thresholds
    eps = {}
    for t, (tp, fp) in {1.0: (5, 4), 2.0: (4, 1), 3.0: (3, 0)}.items():
        tpr_lo = beta.ppf(1 - each, tp, 5 - tp + 1)
        fpr_hi = beta.ppf(each, fp + 1, 5 - fp)
        forward = math.log((tpr_lo - delta) / fpr_hi)
        backward = math.log((1 - fpr_hi - delta) / (1 - tpr_lo))
        eps[t] = (max(forward, backward), tpr_lo, fpr_hi)
    t_best = max(eps, key=lambda t: eps[t][0])
    got = empirical_epsilon(scores, is_member, delta, confidence=c)
    assert got["epsilon_lower_bound"] == pytest.approx(max(0.0, eps[t_best][0]))
    if eps[t_best][0] > 0:
        assert got["threshold"] == t_best
        assert got["tpr_lower"] == pytest.approx(eps[t_best][1])
        assert got["fpr_upper"] == pytest.approx(eps[t_best][2])
    assert got["n_members"] == got["n_nonmembers"] == 5 and got["confidence"] == c


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_perfect_attack_gives_the_closed_form(n):
    scores = np.r_[np.ones(n), np.zeros(n)]
    delta, c = 1e-5, 0.95
    a = (1 - c) / 4  # Bonferroni over 2 bounds at each of the two thresholds, 0 and 1
    lo, hi = a ** (1 / n), 1 - a ** (1 / n)  # CP_lo(n, n), CP_hi(0, n) at level 1 - a
    got = empirical_epsilon(scores, labels(n, n), delta, c)
    assert got["epsilon_lower_bound"] == pytest.approx(math.log((lo - delta) / hi), rel=1e-9)
    assert got["threshold"] == 1.0 and got["tpr_lower"] == pytest.approx(lo)


def test_more_samples_at_the_same_rates_give_a_tighter_bound():
    # TPR 0.5 at FPR 0.02, then chance: the same ROC at every scale.
    def attack(k):
        members = np.r_[np.full(25 * k, 2.0), np.zeros(25 * k)]
        nonmembers = np.r_[np.full(1 * k, 2.0), np.zeros(49 * k)]
        return np.r_[members, nonmembers], labels(50 * k, 50 * k)

    eps = [empirical_epsilon(*attack(k), delta=1e-5)["epsilon_lower_bound"] for k in (1, 4, 16, 64)]
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False))
    assert eps[-1] < math.log(0.5 / 0.02)  # never above the point estimate


def test_random_guesses_give_no_evidence():
    rng = np.random.default_rng(0)
    found = [empirical_epsilon(rng.standard_normal(1000), labels(500, 500), 1e-5)
             ["epsilon_lower_bound"] for _ in range(20)]
    # The best of ~1000 thresholds, each of the 2 bounds at 1 - 0.05/2000 (Bonferroni), so a
    # positive bound on a chance attack has probability <= 5% per draw. Without the
    # correction 3 of these 20 draws were positive (up to 0.36).
    assert np.mean(np.array(found) == 0.0) >= 0.9
    assert max(found) < 0.2


def test_ties_count_every_tied_example_on_the_same_side():
    # Every member and non-member tied at one score: a single threshold, TPR = FPR = 1.
    got = empirical_epsilon(np.ones(20), labels(10, 10), 1e-5)
    assert got["epsilon_lower_bound"] == 0.0 and got["threshold"] is None


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="delta"):
        empirical_epsilon(np.r_[1.0, 0.0], labels(1, 1), 1.5)
    with pytest.raises(ValueError, match="confidence"):
        empirical_epsilon(np.r_[1.0, 0.0], labels(1, 1), 1e-5, confidence=1.0)


def test_accountant_claims_read_the_summary_sample_level_first():
    summary = {"dp": {"privacy_spent": {"epsilon": 3.0, "delta": 1e-5,
                                        "relation": "replace_one"}},
               "client_dp": {"epsilon": {"max": 2.0, "mean": 1.0}, "delta": 1e-6}}
    claims = accountant_claims(summary)
    assert [(c.unit, c.epsilon, c.delta, c.relation) for c in claims] == [
        ("sample", 2.0, 1e-6, "add_or_remove_one"), ("client", 3.0, 1e-5, "replace_one")]
    assert accountant_claims({"dp": {"privacy_spent": {"epsilon": None, "delta": 1e-5}}}) == ()
    assert accountant_claims({}) == ()


def test_the_joint_confidence_holds_for_a_mechanism_at_its_epsilon():
    """Randomized response at exactly ε = 1 (δ = 0) on independent trials: at c = 0.8 the
    reported bound may exceed 1 in at most 20% of draws (it does in far fewer), whereas
    two bounds at 0.8 each would promise only 60% jointly."""
    rng = np.random.default_rng(1)
    p = math.e / (1 + math.e)  # answers "member" correctly with probability e^ε/(1 + e^ε)
    over = 0
    for _ in range(100):
        member = labels(200, 200)
        score = np.where(rng.random(400) < p, member, ~member).astype(float)
        over += empirical_epsilon(score, member, 0.0, confidence=0.8)["epsilon_lower_bound"] > 1
    assert over <= 20


def test_membership_epsilon_sits_beside_the_accountant_and_is_no_bound():
    scores = {"loss": np.r_[np.ones(50), np.zeros(50)]}
    add_remove = membership_epsilon(scores, labels(50, 50),
                                    AccountantClaim(1.5, 1e-5, "client", "dp"))
    assert add_remove["unit"] == "sample" and add_remove["accountant_unit"] == "client"
    assert add_remove["accountant_epsilon"] == 1.5 and add_remove["comparable_epsilon"] == 3.0
    assert add_remove["valid_for_one_run"] is False and "not a lower bound" in add_remove["what"]
    loss = add_remove["loss"]
    assert "epsilon_lower_bound" not in loss and loss["epsilon_if_independent"] > 0
    assert loss["delta"] == 1e-5
    # replace-one at the client level: one changed sample is one replaced client
    replace = membership_epsilon(scores, labels(50, 50),
                                 AccountantClaim(1.5, 1e-5, "client", "dp", "replace_one"))
    assert replace["comparable_epsilon"] == 1.5 and replace["accountant_relation"] == \
        "replace_one"
