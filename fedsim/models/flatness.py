"""Flatness of a loss at given weights: the top Hessian eigenvalue and random-perturbation
sharpness (Keskar et al., ICLR 2017; Jiang et al., "Fantastic generalization measures",
ICLR 2020).

Everything here takes a loss as a pure function of a parameter dict, so it serves any model
(:func:`model_loss`) and any hand-written function (a quadratic in the tests). Randomness
comes from a ``torch.Generator`` the caller derives (:mod:`fedsim.rng`); draws are made on
the CPU and moved to the parameters' device, so results do not depend on the device's RNG.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Params = dict[str, Tensor]
LossFn = Callable[[Params], Tensor]


def model_loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[LossFn, Params]:
    """Mean cross-entropy of ``model`` on ``(x, y)`` as a function of its trainable parameters.

    The model is put in eval mode and its buffers (and frozen parameters) are held fixed: BN
    layers normalize with their running statistics. Eval mode makes the loss a deterministic
    function of the weights alone — in train mode BN's batch statistics (and dropout) would
    change it, and the Hessian would describe a different function per batch.

    Returns the loss function and the current parameter values (detached copies).
    """
    model.eval()
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update({n: b.detach() for n, b in model.named_buffers()})

    def loss(p: Params) -> Tensor:
        logits = torch.func.functional_call(model, {**fixed, **p}, (x,))
        return F.cross_entropy(logits, y)

    return loss, params


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _normal_like(params: Params, generator: torch.Generator) -> Params:
    """Standard normal draws shaped like ``params``, made on the CPU in key order."""
    return {k: torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
            for k, p in params.items()}


def hvp(loss: LossFn, params: Params, v: Params) -> Params:
    """The Hessian-vector product H(params)·v = ∇(∇L·v), by double backward (Pearlmutter 1994).

    Reverse-over-reverse rather than ``torch.func``'s forward-over-reverse: fedsim's
    :class:`~fedsim.models.pool.FastMaxPool2d` is a custom autograd Function with a double
    backward but no forward-mode rule.
    """
    with torch.enable_grad():
        w = {k: t.detach().requires_grad_() for k, t in params.items()}
        grads = torch.autograd.grad(loss(w), list(w.values()), create_graph=True,
                                    allow_unused=True, materialize_grads=True)
        gv = sum((g * v[k]).sum() for g, k in zip(grads, w))
        if not gv.requires_grad:  # the loss is linear in every parameter: H = 0
            return {k: torch.zeros_like(t) for k, t in params.items()}
        hv = torch.autograd.grad(gv, list(w.values()), allow_unused=True,
                                 materialize_grads=True)
    return dict(zip(w, hv))


def hessian_max_eig(loss: LossFn, params: Params, generator: torch.Generator,
                    iters: int = 20, tol: float = 1e-4) -> float:
    """The Hessian eigenvalue of largest magnitude, by power iteration on Hessian-vector products.

    Starts from a Gaussian direction drawn from ``generator``; each step takes the Rayleigh
    quotient λ = vᵀHv of the unit vector v and moves to v ← Hv / ‖Hv‖. Stops after ``iters``
    products or once |Δλ| < tol·|λ|. Power iteration converges to the eigenvalue of largest
    *magnitude*: the top eigenvalue where the Hessian is positive semi-definite (near a
    minimum), possibly a negative one at a saddle. Its error after k steps shrinks like
    (λ₂/λ₁)^(2k); with a small eigengap ``iters`` bounds the cost, not the error.

    Parameters
    ----------
    loss : function of a parameter dict returning a scalar tensor
    params : the point at which the Hessian is taken
    generator : source of the start direction
    iters : at most this many Hessian-vector products (>= 1)
    tol : relative change of λ between steps below which the iteration stops
    """
    v = _normal_like(params, generator)
    norm = _dot(v, v).sqrt()
    v = {k: t / norm for k, t in v.items()}
    eig = None
    for _ in range(iters):
        hv = hvp(loss, params, v)
        new = float(_dot(v, hv))
        norm = _dot(hv, hv).sqrt()
        if eig is not None and abs(new - eig) < tol * abs(new):
            return new
        eig = new
        if norm == 0:  # v is in the null space (e.g. a loss that is flat in every direction)
            return 0.0
        v = {k: t / norm for k, t in hv.items()}
    return eig


def perturbation(params: Params, radius: float, generator: torch.Generator) -> Params:
    """A random direction scaled per tensor: ‖δ_t‖ = radius·‖w_t‖ for each parameter tensor.

    Relative per-tensor scaling makes the measure invariant to rescaling a layer (as the
    magnitude-aware sharpness of Jiang et al. 2020 and the relative box of Keskar et al. 2017);
    a tensor of zero norm is not perturbed.
    """
    out = {}
    for k, d in _normal_like(params, generator).items():
        w = params[k]
        dn = d.norm()
        out[k] = d * (radius * w.norm() / dn) if dn > 0 else d
    return out


@torch.no_grad()
def sharpness(loss: LossFn, params: Params, radius: float, draws: int,
              generator: torch.Generator) -> float:
    """Mean loss increase L(w + δ) − L(w) over ``draws`` random :func:`perturbation` s δ."""
    base = float(loss(params))
    total = 0.0
    for _ in range(draws):
        delta = perturbation(params, radius, generator)
        total += float(loss({k: w + delta[k] for k, w in params.items()})) - base
    return total / draws
