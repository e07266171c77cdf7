"""Membership inference: confidences, the loss attack at both extremes, LiRA vs the loss attack."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from sklearn.datasets import load_digits
from torch import nn

from fedsim.privacy.attacks.lira import lira_scores
from fedsim.privacy.attacks.loss import loss_attack
from fedsim.privacy.attacks.rmia import rmia_scores
from fedsim.privacy.metrics import attack_metrics
from fedsim.privacy.mia import per_example_outputs, shadow_split


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest and immune to oversubscribed CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlp(d_in: int, hidden: int, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> nn.Module:
    """Full-batch Adam without regularization: overfits small training sets on purpose."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def gaussian_classes(rng: np.random.Generator, means: np.ndarray, n: int, noise: float):
    y = rng.integers(0, len(means), n)
    x = means[y] + noise * rng.standard_normal((n, means.shape[1]))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


# --- per-example outputs ---------------------------------------------------------------


def test_confidence_matches_its_definition_and_stays_finite_when_saturated():
    logits = torch.tensor([[2.0, 0.5, -1.0], [50.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 0, 2])
    losses, conf = per_example_outputs(nn.Identity(), logits, y)
    p = torch.softmax(logits.double(), dim=1)
    expected_first = torch.log(p[0, 0]) - torch.log(p[0, 1] + p[0, 2])
    assert conf[0] == pytest.approx(float(expected_first), abs=1e-12)
    assert conf[1] == pytest.approx(50 - np.log(2), abs=1e-12)  # naive log(p/(1-p)) = inf
    assert conf[2] == pytest.approx(-np.log(2), abs=1e-12)
    ref = F.cross_entropy(logits.double(), y, reduction="none").numpy()
    np.testing.assert_allclose(losses, ref, atol=1e-12)


def test_outputs_do_not_depend_on_batching_and_restore_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).train()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    a = per_example_outputs(model, x, y, batch_size=3)
    b = per_example_outputs(model, x, y, batch_size=512)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)
    assert model.training
    assert torch.equal(model[1].running_mean, torch.zeros(8))  # eval mode: stats untouched


def test_loss_attack_scores_low_loss_as_member():
    np.testing.assert_array_equal(loss_attack(np.array([0.1, 2.0])), [-0.1, -2.0])


# --- the loss attack at its two extremes -----------------------------------------------


def test_loss_attack_on_a_model_that_never_saw_the_members_is_chance():
    rng = np.random.default_rng(0)
    means = rng.standard_normal((5, 20))
    x_train, y_train = gaussian_classes(rng, means, 500, 1.5)
    x_in, y_in = gaussian_classes(rng, means, 2000, 1.5)
    x_out, y_out = gaussian_classes(rng, means, 2000, 1.5)
    model = fit(mlp(20, 64, 5, seed=0), x_train, y_train, steps=300, lr=1e-2)
    loss_in, _ = per_example_outputs(model, x_in, y_in)
    loss_out, _ = per_example_outputs(model, x_out, y_out)
    scores = loss_attack(np.concatenate([loss_in, loss_out]))
    auc = attack_metrics(scores, np.arange(4000) < 2000)["auc"]
    assert abs(auc - 0.5) < 0.05  # measured 0.506


def test_loss_attack_on_an_overfit_model_finds_members():
    rng = np.random.default_rng(0)
    means = rng.standard_normal((5, 32))
    x_in, y_in = gaussian_classes(rng, means, 100, 3.0)
    x_out, y_out = gaussian_classes(rng, means, 2000, 3.0)
    model = fit(mlp(32, 64, 5, seed=0), x_in, y_in, steps=300, lr=1e-2)
    loss_in, _ = per_example_outputs(model, x_in, y_in)
    loss_out, _ = per_example_outputs(model, x_out, y_out)
    scores = loss_attack(np.concatenate([loss_in, loss_out]))
    auc = attack_metrics(scores, np.arange(2100) < 100)["auc"]
    assert auc > 0.7  # measured 0.84


# --- shadow split ----------------------------------------------------------------------


def test_even_shadow_count_puts_every_example_in_exactly_half():
    keep = shadow_split(101, 8, np.random.default_rng(0))
    assert keep.shape == (8, 101) and keep.dtype == bool
    assert np.all(keep.sum(axis=0) == 4)
    np.testing.assert_array_equal(keep, shadow_split(101, 8, np.random.default_rng(0)))


def test_odd_shadow_count_keeps_examples_and_shadows_near_half():
    keep = shadow_split(1000, 5, np.random.default_rng(1))
    per_example = keep.sum(axis=0)
    assert set(np.unique(per_example)) == {2, 3}
    assert (per_example == 3).sum() == 500
    assert np.all(np.abs(keep.sum(axis=1) - 500) < 60)


def test_a_single_shadow_gets_half_the_examples():
    keep = shadow_split(10, 1, np.random.default_rng(2))
    assert keep.sum() == 5


# --- LiRA scores on hand-made shadow confidences ---------------------------------------


def test_online_score_is_the_gaussian_log_likelihood_ratio():
    # One example: IN confidences 4, 5, 6 (median 5), OUT -1, 0, 1 (median 0), both with
    # population std sqrt(2/3). Score = ((t - 0)^2 - (t - 5)^2) / (2 * 2/3) = 3.75 at t = 3.
    shadow_conf = np.array([[4.0], [5.0], [6.0], [-1.0], [0.0], [1.0]])
    shadow_in = np.array([[True], [True], [True], [False], [False], [False]])
    assert lira_scores(np.array([3.0]), shadow_conf, shadow_in)[0] == pytest.approx(3.75)
    assert lira_scores(np.array([2.5]), shadow_conf, shadow_in)[0] == pytest.approx(0.0)


def test_offline_scores_one_sided_by_default_and_two_sided_like_the_reference():
    shadow_conf = np.array([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]])
    shadow_in = np.zeros((3, 2), dtype=bool)
    target = np.array([2.0, -2.0])  # one above the OUT mean, one as far below it
    sd = np.sqrt(2 / 3)
    one_sided = lira_scores(target, shadow_conf, shadow_in, online=False)
    np.testing.assert_allclose(one_sided, -norm.logsf(target, 0.0, sd))
    assert one_sided[0] > 1 > one_sided[1] > 0  # only high confidence reads as IN
    two_sided = lira_scores(target, shadow_conf, shadow_in, online=False, one_sided=False)
    np.testing.assert_allclose(two_sided, -norm.logpdf(target, 0.0, sd))
    assert two_sided[0] == pytest.approx(two_sided[1])


def test_fixed_variance_is_the_std_of_all_values_in_a_group():
    shadow_conf = np.array([[0.0, 10.0], [2.0, 14.0], [0.0, 0.0], [0.0, 0.0]])
    shadow_in = np.array([[True, True], [True, True], [False, False], [False, False]])
    sd_in = np.std([0.0, 10.0, 2.0, 14.0])
    target = np.array([1.0, 12.0])
    got = lira_scores(target, shadow_conf + 0.0, shadow_in, online=False, fix_variance=True)
    # OUT values are all 0: the global std is 0, floored at 1e-30 as in the reference.
    assert np.all(got > 1e50)
    shadow_conf[2:] = [[-1.0, 1.0], [1.0, -1.0]]
    got = lira_scores(target, shadow_conf, shadow_in, fix_variance=True)
    expected = norm.logpdf(target, [1.0, 12.0], sd_in) - norm.logpdf(target, 0.0, 1.0)
    np.testing.assert_allclose(got, expected)


def test_examples_without_in_shadows_fall_back_to_the_global_in_fit():
    shadow_conf = np.array([[5.0, 3.0], [7.0, 4.0], [0.0, 1.0], [0.0, -1.0]])
    shadow_in = np.array([[True, False], [True, False], [False, True], [False, False]])
    # Example 1 has a single IN value (1.0): it keeps it as its mean, with the global IN std.
    # Give example 1 no IN shadow at all: global IN median 6, global IN std 1.
    shadow_in[2, 1] = False
    scores = lira_scores(np.array([6.0, 6.0]), shadow_conf, shadow_in)
    assert np.all(np.isfinite(scores))
    out_1 = norm.logpdf(6.0, np.median([3.0, 4.0, 1.0, -1.0]), np.std([3.0, 4.0, 1.0, -1.0]))
    assert scores[1] == pytest.approx(norm.logpdf(6.0, 6.0, 1.0) - out_1)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError):
        lira_scores(np.zeros(3), np.zeros((4, 3)), np.zeros((4, 2), dtype=bool))
    with pytest.raises(ValueError, match="no shadow"):
        lira_scores(np.zeros(2), np.zeros((2, 2)), np.zeros((2, 2), dtype=bool))


# --- LiRA against the loss attack on real shadow models --------------------------------

NUM_MODELS = 17  # each model is the target once, the other 16 are its shadows


@pytest.fixture(scope="module")
def digits_shadow_runs():
    """Per-model losses and confidences of 17 small MLPs, each trained on a random half of
    300 digits until it overfits, with the IN/OUT mask; also each model's confidences on 300
    population digits no model trained on, and those of a model trained on 150 other digits
    (no pool example is its member: the un-planted case)."""
    digits = load_digits()
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(digits.data))
    x_all = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y_all = torch.tensor(digits.target)
    idx, pop_idx, other_idx = perm[:300], perm[300:600], perm[600:750]
    x, y = x_all[idx], y_all[idx]
    keep = shadow_split(len(x), NUM_MODELS, rng)
    losses, confs, pop = [], [], []
    for k in range(NUM_MODELS):
        model = fit(mlp(64, 32, 10, seed=k), x[keep[k]], y[keep[k]], steps=150, lr=3e-2)
        loss, conf = per_example_outputs(model, x, y)
        losses.append(loss)
        confs.append(conf)
        pop.append(per_example_outputs(model, x_all[pop_idx], y_all[pop_idx])[1])
    outsider = fit(mlp(64, 32, 10, seed=99), x_all[other_idx], y_all[other_idx], 150, 3e-2)
    outsider_out = (per_example_outputs(outsider, x, y)[1],
                    per_example_outputs(outsider, x_all[pop_idx], y_all[pop_idx])[1])
    return np.array(losses), np.array(confs), keep, np.array(pop), outsider_out


def leave_one_out(runs, attack):
    """Pool the scores of every model attacked with the other models as its shadows."""
    losses, confs, keep = runs[:3]
    scores = []
    for target in range(NUM_MODELS):
        others = np.arange(NUM_MODELS) != target
        scores.append(attack(losses[target], confs[target], confs[others], keep[others]))
    return attack_metrics(np.concatenate(scores), keep.ravel())


def test_lira_beats_the_loss_attack_at_low_fpr(digits_shadow_runs):
    loss = leave_one_out(digits_shadow_runs, lambda lo, c, sc, si: loss_attack(lo))
    online = leave_one_out(digits_shadow_runs, lambda lo, c, sc, si: lira_scores(c, sc, si))
    offline = leave_one_out(
        digits_shadow_runs, lambda lo, c, sc, si: lira_scores(c, sc, si, online=False)
    )
    # Measured: TPR@1%FPR loss 0.015, online 0.042, offline 0.036; AUC 0.62 / 0.72 / 0.69.
    assert online["tpr_at_fpr_1e-2"] >= loss["tpr_at_fpr_1e-2"]
    assert offline["tpr_at_fpr_1e-2"] >= loss["tpr_at_fpr_1e-2"]
    assert online["auc"] > loss["auc"]



# --- RMIA ---------------------------------------------------------------------------------


def test_rmia_matches_a_hand_computation():
    target = np.array([0.9, 0.5])
    ref = np.array([[0.6, 0.5], [0.8, 0.4]])
    ref_in = np.array([[True, False], [False, False]])  # x0 is OUT for the 2nd reference only
    pop_target = np.array([0.7, 0.2, 0.95])
    pop_ref = np.array([[0.7, 0.3, 0.9], [0.5, 0.1, 0.9]])
    # Pr(x) = ((1 + a) Pr_OUT + 1 - a) / 2 with a = 0.3:
    # x0: Pr_OUT = 0.8, Pr = 0.87, LR = 0.9 / 0.87 = 1.0345
    # x1: Pr_OUT = 0.45, Pr = 0.6425, LR = 0.5 / 0.6425 = 0.7782
    # z: Pr_OUT = 0.6, 0.2, 0.9 -> Pr = 0.74, 0.48, 0.935 -> LR = 0.9459, 0.4167, 1.0160
    got = rmia_scores(target, ref, ref_in, pop_target, pop_ref, a=0.3, gamma=1.0)
    np.testing.assert_allclose(got, [3 / 3, 1 / 3])
    # gamma = 1.05: x0 / z = 1.094, 2.483, 1.018 -> 2 of 3; x1 / z = 0.823, 1.868, 0.766 -> 1
    got = rmia_scores(target, ref, ref_in, pop_target, pop_ref, a=0.3, gamma=1.05)
    np.testing.assert_allclose(got, [2 / 3, 1 / 3])


def test_rmia_equals_the_pairwise_ratio_count_of_the_reference_code():
    rng = np.random.default_rng(3)
    k, n, m = 4, 50, 70
    ref_in = shadow_split(n, k, rng)
    target, ref = rng.uniform(0.01, 1, n), rng.uniform(0.01, 1, (k, n))
    pop_target, pop_ref = rng.uniform(0.01, 1, m), rng.uniform(0.01, 1, (k, m))
    a, gamma = 0.4, 1.3
    p_out = np.array([ref[~ref_in[:, j], j].mean() for j in range(n)])
    lr_x = target / ((1 + a) / 2 * p_out + (1 - a) / 2)
    lr_z = pop_target / ((1 + a) / 2 * pop_ref.mean(0) + (1 - a) / 2)
    expected = np.mean(lr_x[:, None] / lr_z[None, :] > gamma, axis=1)
    got = rmia_scores(target, ref, ref_in, pop_target, pop_ref, a=a, gamma=gamma)
    np.testing.assert_allclose(got, expected)


def test_rmia_refuses_examples_without_out_references_and_bad_parameters():
    ok = dict(pop_target_prob=np.ones(2), pop_ref_prob=np.ones((2, 2)))
    with pytest.raises(ValueError, match="OUT"):
        rmia_scores(np.ones(2), np.ones((2, 2)), np.array([[True, False], [True, True]]), **ok)
    with pytest.raises(ValueError, match="gamma"):
        rmia_scores(np.ones(2), np.ones((2, 2)), np.zeros((2, 2), bool), gamma=0.0, **ok)


def rmia_leave_one_out(runs, a=0.3):
    """RMIA on every model, the other 16 as references; probabilities = sigmoid(φ)."""
    from scipy.special import expit

    _, confs, keep, pop, _ = runs
    scores = []
    for target in range(NUM_MODELS):
        o = np.arange(NUM_MODELS) != target
        scores.append(rmia_scores(expit(confs[target]), expit(confs[o]), keep[o],
                                  expit(pop[target]), expit(pop[o]), a=a))
    return attack_metrics(np.concatenate(scores), keep.ravel())


def test_rmia_finds_planted_members_and_nothing_where_none_are(digits_shadow_runs):
    from scipy.special import expit

    rmia = rmia_leave_one_out(digits_shadow_runs)
    loss = leave_one_out(digits_shadow_runs, lambda lo, c, sc, si: loss_attack(lo))
    assert rmia["auc"] > 0.6
    assert rmia["auc"] > loss["auc"]
    # Measured: AUC rmia 0.666, loss 0.622; TPR@1%FPR 0.037 vs 0.015.
    # A model that trained on none of the pool: "members" are a label, not a fact. Each
    # model's IN mask labels it once, the other 16 as references (pooled: 17 x 300 scores).
    _, confs, keep, pop, (conf_x, conf_z) = digits_shadow_runs
    scores = []
    for label in range(NUM_MODELS):
        o = np.arange(NUM_MODELS) != label
        scores.append(rmia_scores(expit(conf_x), expit(confs[o]), keep[o], expit(conf_z),
                                  expit(pop[o])))
    none = attack_metrics(np.concatenate(scores), keep.ravel())
    assert abs(none["auc"] - 0.5) < 0.04
