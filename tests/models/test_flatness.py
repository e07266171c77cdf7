"""Flatness measures against exact references in float64: a quadratic 0.5·wᵀAw with a known
spectrum, and a softmax regression whose full Hessian torch computes."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.models.flatness import hessian_max_eig, hvp, model_loss, perturbation, sharpness

TOL = 1e-12  # the power iteration's stopping rule: relative change of λ below this


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def symmetric(eigs, seed=0) -> np.ndarray:
    """Q·diag(eigs)·Qᵀ with a random orthogonal Q: a symmetric matrix of known spectrum."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigs), len(eigs))))
    return q @ np.diag(eigs) @ q.T


def quadratic(a: np.ndarray):
    at = torch.from_numpy(a)
    return lambda p: 0.5 * p["w"] @ at @ p["w"]


def power_error_bound(eigs) -> float:
    """|λ₁ − λ| when the iteration stops: λ's error shrinks by r² = (λ₂/λ₁)² per step, so the
    last change is (1 − r²) times the remaining error; plus float64 rounding."""
    mags = sorted(np.abs(eigs), reverse=True)
    r = mags[1] / mags[0]
    return 2 * TOL * mags[0] / (1 - r**2) + 1e-13 * mags[0]


@pytest.mark.parametrize("eigs", [[5.0, 2.5, 1.0, -0.5, 0.1, 0.0],
                                  [-4.0, 1.0, 0.5, 3.0]])  # largest magnitude is negative
def test_power_iteration_finds_the_quadratics_eigenvalue_of_largest_magnitude(eigs):
    a = symmetric(eigs)
    ref = np.linalg.eigvalsh(a)
    top = ref[np.argmax(np.abs(ref))]
    params = {"w": torch.ones(len(eigs), dtype=torch.float64)}
    eig = hessian_max_eig(quadratic(a), params, gen(0), iters=1000, tol=TOL)
    assert abs(eig - top) <= power_error_bound(ref)


def softmax_regression(n=32, d=4, k=3):
    g = gen(1)
    model = nn.Linear(d, k).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(k, d, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(k, generator=g, dtype=torch.float64))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    return model, x, y


def exact_hessian(model, x, y) -> torch.Tensor:
    w, b = model.weight.detach(), model.bias.detach()

    def f(theta):
        wt, bt = theta[: w.numel()].view_as(w), theta[w.numel():]
        return nn.functional.cross_entropy(x @ wt.T + bt, y)

    return torch.autograd.functional.hessian(f, torch.cat([w.flatten(), b]))


def test_hvp_of_a_model_equals_the_exact_hessian_times_v():
    model, x, y = softmax_regression()
    loss, params = model_loss(model, x, y)
    v = {k: torch.randn(p.shape, generator=gen(2), dtype=p.dtype) for k, p in params.items()}
    hv = hvp(loss, params, v)
    flat = lambda d: torch.cat([d["weight"].flatten(), d["bias"]])  # noqa: E731
    ref = exact_hessian(model, x, y) @ flat(v)
    torch.testing.assert_close(flat(hv), ref, rtol=1e-12, atol=1e-14)


def test_top_eigenvalue_of_softmax_regression_matches_the_exact_hessian():
    model, x, y = softmax_regression()
    ref = np.linalg.eigvalsh(exact_hessian(model, x, y).numpy())
    assert ref[-1] > 0 and abs(ref[0]) < ref[-1]  # convex: the top one is the largest in size
    assert ref[-2] / ref[-1] < 0.99  # a gap, so the bound below is reached within iters
    loss, params = model_loss(model, x, y)
    eig = hessian_max_eig(loss, params, gen(0), iters=5000, tol=TOL)
    assert abs(eig - ref[-1]) <= power_error_bound(ref)
    assert not model.training  # model_loss evaluates in eval mode


def test_perturbation_has_the_relative_norm_of_each_tensor():
    params = {"a": torch.arange(6, dtype=torch.float64).view(2, 3),
              "b": torch.tensor([3.0, -4.0], dtype=torch.float64),
              "zero": torch.zeros(4, dtype=torch.float64)}
    delta = perturbation(params, 0.05, gen(0))
    for key in ("a", "b"):
        assert math.isclose(delta[key].norm().item(), 0.05 * params[key].norm().item(),
                            rel_tol=1e-14)
    assert torch.equal(delta["zero"], torch.zeros(4, dtype=torch.float64))


def test_sharpness_is_zero_at_zero_radius_and_fixed_by_the_generator():
    model, x, y = softmax_regression()
    loss, params = model_loss(model, x, y)
    assert sharpness(loss, params, 0.0, 3, gen(0)) == 0.0
    a = sharpness(loss, params, 0.1, 3, gen(7))
    assert a == sharpness(loss, params, 0.1, 3, gen(7))
    assert a != sharpness(loss, params, 0.1, 3, gen(8))


def test_sharpness_on_a_quadratic_matches_the_analytic_expectation():
    """δ is uniform on the sphere of radius ρ = radius·‖w‖: E[wᵀAδ] = 0 and
    E[½δᵀAδ] = ½ρ²·tr(A)/n; the tolerance is 5 standard errors of the mean over the draws,
    from the exact variance ρ²‖Aw‖²/n + ¼ρ⁴·2(n·tr(A²) − tr(A)²)/(n²(n+2))."""
    eigs = [3.0, 2.0, 1.5, 1.0, 0.5, 0.2]
    n, radius, draws = len(eigs), 0.5, 3000
    a = symmetric(eigs, seed=3)
    w = np.full(n, 0.3)
    rho2 = radius**2 * float(w @ w)
    tr, tr2 = float(np.trace(a)), float(np.trace(a @ a))
    expected = 0.5 * rho2 * tr / n
    var = rho2 * float(np.sum((a @ w) ** 2)) / n + 0.25 * rho2**2 * 2 * (n * tr2 - tr**2) / (
        n**2 * (n + 2))
    tol = 5 * math.sqrt(var / draws)
    assert tol < 0.2 * expected  # the check can tell a wrong factor apart
    got = sharpness(quadratic(a), {"w": torch.from_numpy(w)}, radius, draws, gen(0))
    assert abs(got - expected) <= tol
