"""Gradient inversion: the client's gradient, iDLG labels, image reconstruction, image metrics."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import fedsim.privacy.inversion as inversion
from fedsim.client.train import plan_batches, train_local
from fedsim.config import ClientConfig, InversionConfig
from fedsim.errors import ScenarioError
from fedsim.privacy.inversion import (
    best_of_restarts,
    client_gradient,
    image_metrics,
    invert_gradients,
    invert_update,
    match_reconstructions,
    psnr,
    recover_labels,
    save_image_grid,
    simulate_update,
    ssim,
    total_variation,
)
from fedsim.rng import torch_generator


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest and immune to oversubscribed CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    """8×8 digit images in [0, 1], shape (N, 1, 8, 8), and their labels."""
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32)[:, None]
    return x, torch.tensor(data.target)


def linear_model(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10, bias=bias))


def one_hidden_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


# --- what the client uploads -----------------------------------------------------------


def test_client_gradient_is_one_sgd_step_divided_by_minus_lr(digits):
    x, y = digits[0][:4], digits[1][:4]
    model = one_hidden_layer()
    grads = client_gradient(model, x, y)
    stepped = one_hidden_layer()
    opt = torch.optim.SGD(stepped.parameters(), lr=0.1)
    F.cross_entropy(stepped(x), y).backward()
    opt.step()
    for g, before, after in zip(grads, model.parameters(), stepped.parameters()):
        torch.testing.assert_close(g, (before - after).detach() / 0.1, atol=1e-5, rtol=1e-4)


def test_client_gradient_in_train_mode_leaves_the_callers_bn_untouched(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    client_gradient(model, digits[0][:4], digits[1][:4], bn_mode="train")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training  # a fresh module's mode is unchanged too
    with pytest.raises(ValueError, match="bn_mode"):
        client_gradient(model, digits[0][:4], digits[1][:4], bn_mode="batch")


# --- labels ----------------------------------------------------------------------------


@pytest.mark.parametrize("label", range(10))
def test_idlg_recovers_the_label_of_one_image_exactly(digits, label):
    x, y = digits
    i = int(torch.nonzero(y == label)[0])
    model = one_hidden_layer()
    grads = client_gradient(model, x[i : i + 1], y[i : i + 1])
    assert recover_labels(grads[-2], grads[-1]).tolist() == [label]
    # Without the bias: the sign of the weight rows (ReLU features are non-negative).
    assert recover_labels(grads[-2]).tolist() == [label]


def test_idlg_weight_rule_works_on_raw_pixels_without_bias(digits):
    x, y = digits
    model = linear_model(bias=False)
    for i in range(5):
        grads = client_gradient(model, x[i : i + 1], y[i : i + 1])
        assert recover_labels(grads[-1]).tolist() == [int(y[i])]


def test_batch_labels_heuristic_finds_distinct_labels_and_counts(digits):
    x, y = digits
    model = one_hidden_layer()
    picks = [int(torch.nonzero(y == c)[0]) for c in (1, 4, 7)]
    grads = client_gradient(model, x[picks], y[picks])
    assert recover_labels(grads[-2], grads[-1], num_images=3).tolist() == [1, 4, 7]
    # Two images of class 4 and one of 1: the larger negative mass of 4 gets the extra label.
    picks = [int(i) for i in torch.nonzero(y == 4)[:2]] + [int(torch.nonzero(y == 1)[0])]
    grads = client_gradient(model, x[picks], y[picks])
    assert recover_labels(grads[-2], grads[-1], num_images=3).tolist() == [1, 4, 4]


# --- reconstruction --------------------------------------------------------------------


@pytest.mark.parametrize("make_model", [linear_model, one_hidden_layer])
def test_inverting_gradients_recovers_one_digit(digits, make_model):
    x, y = digits[0][3:4], digits[1][3:4]
    model = make_model()
    grads = client_gradient(model, x, y)
    labels = recover_labels(grads[-2], grads[-1])
    assert labels.tolist() == y.tolist()
    result = invert_gradients(
        model, grads, labels, (1, 8, 8), steps=300, lr=0.1, tv_weight=1e-4, seed=1
    )
    assert result.x.shape == (1, 1, 8, 8)
    assert result.x.min() >= 0 and result.x.max() <= 1  # clamped to the default bounds
    assert psnr(result.x, x, data_range=1.0) > 30  # measured 72.8 dB (linear), 77.5 dB (MLP)
    assert result.loss < 1e-3


def test_inversion_is_seeded_and_leaves_the_model_alone(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))
    x, y = digits[0][:2], digits[1][:2]
    grads = client_gradient(model, x, y, bn_mode="train")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = dict(num_images=2, steps=5, bn_mode="train", seed=3)
    a = invert_gradients(model, grads, y, (1, 8, 8), **kwargs)
    b = invert_gradients(model, grads, y, (1, 8, 8), **kwargs)
    c = invert_gradients(model, grads, y, (1, 8, 8), **{**kwargs, "seed": 4})
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inversion_refuses_inconsistent_inputs(digits):
    model = linear_model()
    grads = client_gradient(model, digits[0][:1], digits[1][:1])
    with pytest.raises(ValueError, match="labels"):
        invert_gradients(model, grads, digits[1][:2], (1, 8, 8), steps=1)
    with pytest.raises(ValueError, match="target_grads"):
        invert_gradients(model, grads[:1], digits[1][:1], (1, 8, 8), steps=1)
    with pytest.raises(ValueError, match="tv_weight"):
        invert_gradients(model, grads, digits[1][:1], (64,), steps=1, tv_weight=0.1)


# --- restarts --------------------------------------------------------------------------


def test_best_of_restarts_picks_the_lowest_objective_and_never_nan():
    losses = [3.0, float("nan"), 1.0, 1.0, 2.0]
    result = best_of_restarts(lambda r: (torch.full((1,), float(r)), losses[r]), 5)
    assert result.best == 2 and result.loss == 1.0 and float(result.x) == 2.0  # first of ties
    assert result.losses[0] == 3.0 and math.isnan(result.losses[1])
    with pytest.raises(ValueError, match="restarts"):
        best_of_restarts(lambda r: (torch.zeros(1), 0.0), 0)


@pytest.fixture
def recorded_restarts(monkeypatch):
    """Every restart's (images, objective), as the optimizer returns them."""
    runs = []
    real = inversion._optimize

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        runs.append(out)
        return out

    monkeypatch.setattr(inversion, "_optimize", spy)
    return runs


def test_restarts_keep_the_run_with_the_lowest_objective(digits, recorded_restarts):
    x, y = digits[0][:2], digits[1][:2]
    model = one_hidden_layer()
    grads = client_gradient(model, x, y)
    kwargs = dict(num_images=2, steps=15, seed=7)
    result = invert_gradients(model, grads, y, (1, 8, 8), restarts=4, **kwargs)
    objectives = [loss for _, loss in recorded_restarts]
    assert len(objectives) == 4 and len(set(objectives)) == 4  # different starts
    assert result.losses == tuple(objectives) and result.loss == min(objectives)
    assert torch.equal(result.x, recorded_restarts[int(np.argmin(objectives))][0])
    # One restart is restart 0 of many, bit for bit: adding restarts never changes it.
    single = invert_gradients(model, grads, y, (1, 8, 8), restarts=1, **kwargs)
    assert torch.equal(single.x, recorded_restarts[0][0]) and single.loss == objectives[0]
    assert single.losses == (single.loss,) and single.best == 0


# --- the multi-step upload --------------------------------------------------------------


def bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(256, 10))


@pytest.mark.parametrize("cfg", [
    ClientConfig(epochs=2, batch_size=2, lr=0.1, momentum=0.9, weight_decay=1e-3),
    ClientConfig(local_steps=3, batch_size=3, lr=0.05),
])
def test_simulated_update_with_the_true_data_is_the_real_clients_update(digits, cfg):
    """The attacker's model of local training: with the true images, its functional
    simulation gives the upload fedsim's client computes (parameters and BN buffers)."""
    x, y = digits[0][:5], digits[1][:5]
    model = bn_cnn()
    plan = plan_batches(5, cfg, torch_generator(1, "test"))
    real = bn_cnn()
    train_local(real, x, y, cfg, torch_generator(1, "test"))
    sim = simulate_update(model, x, y, plan, cfg.lr, cfg.momentum, cfg.weight_decay,
                          running=("1",))
    assert len(plan) == (4 if cfg.local_steps == 0 else 3)  # the trailing singleton dropped
    for u, before, after in zip(sim.update, model.parameters(), real.parameters()):
        torch.testing.assert_close(u, (before - after).detach(), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(sim.running["1"][0], real[1].running_mean, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(sim.running["1"][1], real[1].running_var, atol=1e-6, rtol=1e-4)
    assert torch.equal(model[1].running_mean, torch.zeros(4))  # the sent model is untouched


def test_inverting_a_multi_step_update_beats_the_random_start(digits):
    x, y = digits[0][[3, 4]], digits[1][[3, 4]]  # a 3 and a 4
    cfg = ClientConfig(local_steps=3, batch_size=1, lr=0.1)
    model = one_hidden_layer()
    plan = plan_batches(2, cfg, torch_generator(2, "test"), drop_singleton=False)
    real = one_hidden_layer()
    train_local(real, x, y, cfg, torch_generator(2, "test"), drop_singleton=False)
    update = [(b - a).detach() for b, a in zip(model.parameters(), real.parameters())]
    labels = recover_labels(update[-2], update[-1], num_images=2)
    assert labels.tolist() == y.tolist()
    result = invert_update(model, update, labels, (1, 8, 8), plan, cfg.lr, steps=200, seed=1)
    start = torch.randn((2, 1, 8, 8), generator=torch_generator(1, "privacy", "inversion-init"))
    before = image_metrics(x, start.clamp(0, 1))["psnr"]
    after = image_metrics(x, result.x)["psnr"]
    assert after > before + 15  # measured: 6.2 dB from the start, 41.6 dB after
    assert result.loss < 1e-2


def test_invert_update_refuses_inconsistent_inputs(digits):
    model = one_hidden_layer()
    update = [torch.zeros_like(p) for p in model.parameters()]
    labels = digits[1][:2]
    with pytest.raises(ValueError, match="no local step"):
        invert_update(model, update, labels, (1, 8, 8), [], 0.1, steps=1)
    with pytest.raises(ValueError, match="beyond"):
        invert_update(model, update, labels, (1, 8, 8), [torch.tensor([2])], 0.1, steps=1)
    with pytest.raises(ValueError, match="target_update"):
        invert_update(model, update[:1], labels, (1, 8, 8), [torch.tensor([0])], 0.1, steps=1)


@pytest.mark.parametrize(("key", "value", "pattern"), [
    ("restarts", 0, "privacy.inversion.restarts = 0 .* >= 1"),
    ("target", "upload", "privacy.inversion.target = 'upload' .*'step'.*'update'"),
])
def test_inversion_keys_are_validated(key, value, pattern):
    with pytest.raises(ScenarioError, match=pattern):
        InversionConfig(**{key: value})


# --- image metrics ---------------------------------------------------------------------


def test_psnr_hand_case():
    ref = torch.zeros(2, 1, 4, 4)
    x = torch.stack([torch.full((1, 4, 4), 0.1), torch.full((1, 4, 4), 0.01)])
    # MSE 1e-2 → 20 dB and 1e-4 → 40 dB; the batch value is their mean.
    assert psnr(x, ref, data_range=1.0) == pytest.approx(30.0)
    # On a [0, 255] scale the same error is 255× larger and so is the range: same PSNR.
    assert psnr(x * 255, ref, data_range=255.0) == pytest.approx(30.0)
    assert psnr(ref, ref) == math.inf


def test_ssim_of_an_image_with_itself_is_one_and_falls_with_noise(digits):
    x = digits[0][:4]
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen)
    values = [ssim((x + s * noise).clamp(0, 1), x) for s in (0.05, 0.1, 0.2, 0.4)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[0] < 1


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = 0.2, 0.6
    c1 = (0.01 * 1.0) ** 2
    x = torch.full((1, 1, 8, 8), a, dtype=torch.float64)
    y = torch.full((1, 1, 8, 8), b, dtype=torch.float64)
    assert ssim(x, y) == pytest.approx((2 * a * b + c1) / (a**2 + b**2 + c1), abs=1e-9)


def test_ssim_window_shrinks_for_small_images():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 8, 8, generator=gen), torch.rand(2, 3, 8, 8, generator=gen)
    assert ssim(x, y) == ssim(x, y, win_size=7)  # 8×8 images use a 7-wide window
    big_x, big_y = torch.rand(1, 1, 16, 16, generator=gen), torch.rand(1, 1, 16, 16, generator=gen)
    assert ssim(big_x, big_y) == ssim(big_x, big_y, win_size=11)
    with pytest.raises(ValueError, match="win_size"):
        ssim(x, y, win_size=9)


def test_total_variation_hand_case():
    img = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])  # vertical edge: |dx| = 1, dy = 0
    assert float(total_variation(img)) == pytest.approx(1.0)


def test_images_are_matched_to_reconstructions_before_metrics(digits):
    true = digits[0][:3]
    recon = true[[2, 0, 1]]
    matched, order = match_reconstructions(true, recon)
    assert torch.equal(matched, true)
    np.testing.assert_array_equal(order, [1, 2, 0])
    metrics = image_metrics(true, recon)
    assert metrics["psnr"] == math.inf and metrics["mse"] == 0 and metrics["ssim"] == 1


def test_save_image_grid_writes_a_png(tmp_path, digits):
    path = save_image_grid(digits[0][:3], digits[0][3:6], tmp_path / "grid.png", bounds=(0, 1))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
