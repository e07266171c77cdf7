"""Gradient inversion: the server, as attacker, reconstructs a client's images from its update.

The threat model reads as breaching's pipeline: the server sends a model; the client computes
one local step on a batch (:func:`client_gradient`); the server reads the labels off the
last-layer gradient (:func:`recover_labels`, iDLG) and optimizes dummy images until their
gradient matches (:func:`invert_gradients`, Geiping et al. 2020); PSNR and SSIM after an
optimal matching of images to reconstructions say how much leaked (:func:`image_metrics`).

A FedAvg client uploads the result of many local steps, not one gradient: :func:`invert_update`
attacks that upload (Geiping et al. §5, "inverting multiple local updates") by simulating the
client's SGD steps on the candidate images (:func:`simulate_update`) and matching the simulated
update to the observed one. Both attacks keep the best of ``restarts`` random starts by their
own objective, as the reference implementation does.

Image tensors are ``(B, C, H, W)``; ``data_range`` in the metrics is the width of the interval
the pixel values live in (1.0 for images in [0, 1], 2.0 for [-1, 1], or ``hi - lo`` of the
``bounds`` given to the attack), as in scikit-image.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from fedsim.files import make_folder, save_figure
from fedsim.models.local_sgd import BATCH_MEAN, FixedBatches, OneClient, local_steps
from fedsim.models.sgd_step import SGD
from fedsim.rng import torch_generator

BN_MODES = ("eval", "train")


def _prepared_copy(model: nn.Module, bn_mode: str) -> nn.Module:
    """A private copy of ``model`` in ``bn_mode``, so train-mode BN leaves the caller's
    running statistics untouched."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown bn_mode {bn_mode!r}; choose one of: {', '.join(BN_MODES)}")
    clone = copy.deepcopy(model)
    clone.train(bn_mode == "train")
    return clone


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def client_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, bn_mode: str = "eval"
) -> list[torch.Tensor]:
    """Gradient of the mean cross-entropy on ``(x, y)`` that a client's update reveals.

    One local SGD step uploads ``w - lr * grad`` (or the delta ``-lr * grad``); the server knows
    ``w`` and ``lr``, so it holds this gradient up to a known scale, and the cosine objective of
    :func:`invert_gradients` ignores scale anyway. Multi-step updates only approximate it.

    ``bn_mode="train"`` normalizes with the batch's own statistics, as a client training a BN
    model does; ``"eval"`` uses the running statistics. The mode applies to the whole model
    (dropout too), and the attacker must use the same one. The caller's model is not changed.
    Returns one tensor per trainable parameter, in ``model.parameters()`` order.
    """
    clone = _prepared_copy(model, bn_mode)
    loss = F.cross_entropy(clone(x), y.long())
    return [g.detach() for g in torch.autograd.grad(loss, _trainable(clone))]


def recover_labels(
    grad_last_weight: torch.Tensor,
    grad_last_bias: torch.Tensor | None = None,
    num_images: int = 1,
) -> torch.Tensor:
    """Labels of a client's batch read from the last (classifier) layer's gradient.

    With softmax cross-entropy the gradient of the logits is ``p - onehot(y)``: only the true
    class is negative. iDLG (Zhao et al. 2020) reads it off the bias gradient, or off the sign
    of the weight-gradient rows ``(p - onehot(y)) h^T``, whose sums are negative only for the
    true class when the layer's inputs ``h`` are non-negative (after ReLU, or raw pixels in
    [0, 1]); without a bias and with signed inputs the row-sum rule can fail. For one image
    it is exact.

    For ``num_images > 1`` this is an approximate heuristic (not iDLG): every class with a
    negative entry gets one label, and any remaining labels are apportioned to those classes in
    proportion to their negative mass (D'Hondt rule); if there are more negative classes than
    images, the most negative win. Batch order cannot be recovered, so labels come sorted.

    Parameters
    ----------
    grad_last_weight
        Gradient of the classifier weight, shape (num_classes, features).
    grad_last_bias
        Gradient of the classifier bias, shape (num_classes,), if the layer has one.
    num_images
        Batch size the client used.
    """
    if num_images < 1:
        raise ValueError("num_images must be at least 1")
    if grad_last_bias is not None:
        signal = grad_last_bias.detach().double().flatten()
    else:
        signal = grad_last_weight.detach().double().flatten(1).sum(dim=1)
    if num_images == 1:
        return signal.argmin().reshape(1)
    negative = torch.nonzero(signal < 0).flatten()
    negative = negative[signal[negative].argsort()]  # most negative first
    if len(negative) == 0:
        negative = signal.argsort()[:1]
    if len(negative) >= num_images:
        return negative[:num_images].sort().values
    mass = -signal[negative].clamp(max=0)
    counts = torch.ones_like(negative)
    for _ in range(num_images - len(negative)):
        counts[(mass / (counts + 1)).argmax()] += 1
    return negative.repeat_interleave(counts).sort().values


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of a batch of images ``(B, C, H, W)`` (as Geiping et al.):
    mean absolute difference between horizontal neighbours plus between vertical ones."""
    if x.ndim != 4:
        raise ValueError(f"total variation needs (B, C, H, W) images, got shape {tuple(x.shape)}")
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()
    return dx + dy


def _cosine_distance(grads: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """1 − cosine similarity of two gradient lists, each read as one flattened vector
    (Geiping et al.'s ``sim`` cost with all layers and equal weights)."""
    dot = sum((g * t).sum() for g, t in zip(grads, target))
    g_norm = sum(g.pow(2).sum() for g in grads).sqrt()
    t_norm = sum(t.pow(2).sum() for t in target).sqrt()
    return 1 - dot / (g_norm * t_norm + 1e-12)


class InversionResult(NamedTuple):
    """Reconstructed images (detached, on the model's device) and the final objective of the
    chosen restart; ``losses`` holds every restart's final objective, ``best`` the chosen one's
    index (the lowest objective; the first on ties)."""

    x: torch.Tensor
    loss: float
    losses: tuple[float, ...] = ()
    best: int = 0


def _init_generator(seed: int, restart: int) -> torch.Generator:
    """The start point's generator: restart 0 keeps the single-restart stream, so adding
    restarts never changes the first one."""
    if restart == 0:
        return torch_generator(seed, "privacy", "inversion-init")
    return torch_generator(seed, "privacy", "inversion-init", restart)


def _optimize(
    objective: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    device: torch.device,
    steps: int,
    lr: float,
    bounds: tuple[float, float] | None,
    generator: torch.Generator,
) -> tuple[torch.Tensor, float]:
    """One restart of Geiping et al.'s optimizer: a standard-normal start clamped to
    ``bounds``, Adam on the *signed* gradient, the step size divided by 10 at 3/8, 5/8 and 7/8
    of ``steps``, a clamp after every step. Returns the images and the final objective."""
    x = torch.randn(shape, generator=generator).to(device)
    if bounds is not None:
        x.clamp_(*bounds)
    x.requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    milestones = [int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        cost = objective(x)
        (x_grad,) = torch.autograd.grad(cost, [x])
        x.grad = x_grad.sign_()
        optimizer.step()
        scheduler.step()
        if bounds is not None:
            with torch.no_grad():
                x.clamp_(*bounds)
    return x.detach(), float(objective(x).detach())


def best_of_restarts(
    run: Callable[[int], tuple[torch.Tensor, float]], restarts: int
) -> InversionResult:
    """Run ``run(restart)`` for ``restart = 0 .. restarts-1`` and keep the reconstruction with
    the lowest objective — the attacker's own loss, since PSNR needs the true images. A NaN
    objective never wins. Geiping et al.'s reference keeps the best of many trials likewise."""
    if restarts < 1:
        raise ValueError("restarts must be at least 1")
    best_x, losses, best = None, [], 0
    for restart in range(restarts):
        x, loss = run(restart)
        losses.append(loss)
        key = math.inf if math.isnan(loss) else loss
        if best_x is None or key < (math.inf if math.isnan(losses[best]) else losses[best]):
            best_x, best = x, restart
    return InversionResult(best_x, losses[best], tuple(losses), best)


def _attack_setup(model: nn.Module, bn_mode: str, targets, what: str, labels: torch.Tensor,
                  num_images: int, input_shape, tv_weight: float):
    """The attacker's copy of the model (``bn_mode``), its trainable parameters, the observed
    ``targets`` (gradients or an update, checked against those parameters) and labels on its
    device, and the reconstruction's shape."""
    clone = _prepared_copy(model, bn_mode)
    params = _trainable(clone)
    if len(params) != len(targets) or any(p.shape != g.shape for p, g in zip(params, targets)):
        raise ValueError(f"{what}: one tensor per trainable parameter of the model, same shapes")
    device = params[0].device
    shape = (num_images, *input_shape)
    if tv_weight > 0 and len(shape) != 4:
        raise ValueError("tv_weight > 0 needs image inputs (C, H, W); pass tv_weight=0")
    return (clone, params, [t.detach().to(device) for t in targets],
            labels.to(device).long(), shape)


def invert_gradients(
    model: nn.Module,
    target_grads: list[torch.Tensor],
    labels: torch.Tensor,
    input_shape: tuple[int, ...],
    num_images: int = 1,
    steps: int = 2000,
    lr: float = 0.1,
    tv_weight: float = 1e-4,
    seed: int = 0,
    bn_mode: str = "eval",
    bounds: tuple[float, float] | None = (0.0, 1.0),
    bn_stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    bn_weight: float = 0.0,
    restarts: int = 1,
) -> InversionResult:
    """Reconstruct a client's inputs from its gradient ("Inverting Gradients", Geiping et al.,
    NeurIPS 2020).

    Minimizes ``1 − cos(∇θ L(x̂, labels), target_grads) + tv_weight · TV(x̂)`` over dummy images
    x̂, with Adam on the *signed* gradient of x̂, the learning rate divided by 10 at 3/8, 5/8 and
    7/8 of ``steps``, and x̂ clamped to ``bounds`` after every step. The start point is drawn
    from a standard normal with the generator ``fedsim.rng.torch_generator(seed, "privacy",
    "inversion-init")`` (restart ``r > 0``: ``(seed, "privacy", "inversion-init", r)``); of
    ``restarts`` independent runs the one with the lowest objective is kept
    (:func:`best_of_restarts`).

    Parameters
    ----------
    model
        The model the server sent (left unchanged; a copy runs in ``bn_mode``).
    target_grads
        The client's gradient, one tensor per trainable parameter (see
        :func:`client_gradient`).
    labels
        The batch's labels, e.g. from :func:`recover_labels`.
    input_shape
        Shape of one input, e.g. ``(1, 8, 8)``.
    num_images
        Batch size to reconstruct; must equal ``len(labels)``.
    steps, lr, tv_weight
        Optimization length, Adam step size, and weight of the total-variation prior (which
        needs image-shaped inputs; use 0 for flat feature vectors).
    seed
        Seed for the initial guess.
    bn_mode
        ``"eval"`` or ``"train"``; must match the mode the client used.
    bounds
        ``(lo, hi)`` box for the data, or None for no clamping.
    bn_stats, bn_weight
        Per-channel (mean, unbiased variance) of the client batch at the *input* of named
        modules (e.g. recovered from uploaded BN buffers, see
        :func:`fedsim.privacy.leakage.recover_batch_stats`); adds ``bn_weight · Σ (‖μ̂ − μ‖ +
        ‖σ̂² − σ²‖)`` over those modules, the BN-statistics prior of Yin et al. (CVPR 2021,
        "See through Gradients") and Hatamizadeh et al. (IEEE TMI 2023).
    restarts
        Independent random starts; the lowest final objective wins.

    Returns
    -------
    InversionResult ``(x, loss, losses, best)``: the reconstruction, shape
    ``(num_images, *input_shape)``, the objective at it, every restart's objective and the
    chosen restart.
    """
    if len(labels) != num_images:
        raise ValueError(f"{len(labels)} labels for {num_images} images")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    clone, params, target, labels, shape = _attack_setup(
        model, bn_mode, target_grads, "target_grads", labels, num_images, input_shape, tv_weight)
    device = params[0].device

    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    if bn_stats and bn_weight > 0:
        modules = dict(clone.named_modules())
        missing = [name for name in bn_stats if name not in modules]
        if missing:
            raise ValueError(f"bn_stats name modules the model lacks: {', '.join(missing)}")
        for name in bn_stats:
            handles.append(modules[name].register_forward_hook(_batch_stats_hook(name, seen)))
        stats = {k: (m.to(device).float(), v.to(device).float()) for k, (m, v) in
                 bn_stats.items()}

    def objective(x: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(clone(x), labels)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        cost = _cosine_distance(list(grads), target)
        if tv_weight > 0:
            cost = cost + tv_weight * total_variation(x)
        if handles:
            prior = sum((seen[k][0] - m).norm() + (seen[k][1] - v).norm()
                        for k, (m, v) in stats.items())
            cost = cost + bn_weight * prior
        return cost

    try:
        return best_of_restarts(
            lambda r: _optimize(objective, shape, device, steps, lr, bounds,
                                _init_generator(seed, r)),
            restarts)
    finally:
        for handle in handles:
            handle.remove()


class SimulatedUpdate(NamedTuple):
    """What :func:`simulate_update` returns: ``w_sent − w_after`` per trainable parameter (in
    ``model.parameters()`` order) and, per named module, the running (mean, variance) its
    BatchNorm buffers hold after the steps."""

    update: list[torch.Tensor]
    running: dict[str, tuple[torch.Tensor, torch.Tensor]]


def simulate_update(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: Sequence[torch.Tensor],
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    bn_mode: str = "train",
    create_graph: bool = False,
    running: Sequence[str] = (),
) -> SimulatedUpdate:
    """The upload of a client that runs minibatch SGD on ``(x, y)`` from ``model``, computed
    functionally so that it is differentiable in ``x`` (``create_graph=True``).

    One step per entry of ``plan`` (the indices of each batch, in order, as
    :func:`fedsim.models.local_sgd.plan_batches` gives them), on the client's own step loop
    (:mod:`fedsim.models.local_sgd`) with torch's SGD rule: ``g + wd·w``, momentum buffer
    ``b = g`` at the first step and ``μ·b + g`` after, ``w ← w − lr·b``. Modules
    named in ``running`` (BatchNorm layers in train mode) get their running statistics folded
    in as BatchNorm does, from each batch's mean and unbiased variance at their input, so the
    uploaded buffers can be matched too. The caller's model is not changed.
    """
    return _simulate(_prepared_copy(model, bn_mode), x, y, plan, lr, momentum, weight_decay,
                     create_graph, running)


def _simulate(clone: nn.Module, x: torch.Tensor, y: torch.Tensor,
              plan: Sequence[torch.Tensor], lr: float, momentum: float, weight_decay: float,
              create_graph: bool, running: Sequence[str]) -> SimulatedUpdate:
    """:func:`simulate_update` on a prepared copy: the client's step loop
    (:func:`fedsim.models.local_sgd.local_steps`) on the copy, functionally
    (:class:`~fedsim.models.local_sgd.OneClient` with ``functional``), so the copy's own
    arrays stay as they are and one copy serves many calls. The running statistics of
    ``running`` are folded in from each step's forward pass by a forward hook, as a
    function of ``x``."""
    modules = dict(clone.named_modules())
    stats = {n: (modules[n].running_mean.detach().clone(), modules[n].running_var.detach().clone())
             for n in running}
    tracked = {n: int(modules[n].num_batches_tracked) for n in running}

    def fold(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output) -> None:
            mean, var = _input_stats(inputs[0])
            tracked[name] += 1
            f = module.momentum if module.momentum is not None else 1.0 / tracked[name]
            stats[name] = ((1 - f) * stats[name][0] + f * mean, (1 - f) * stats[name][1] + f * var)
        return hook

    handles = [modules[n].register_forward_hook(fold(n)) for n in running]
    client = OneClient(clone, x, y.long(), FixedBatches(list(plan)),
                       SGD(lr, momentum, weight_decay), functional=True,
                       create_graph=create_graph)
    start = client.trained()
    try:
        local_steps(client, BATCH_MEAN)
    finally:
        for handle in handles:
            handle.remove()
    final = client.trained()
    update = [start[n] - final[n] for n in start]
    if not create_graph:
        update = [u.detach() for u in update]
        stats = {n: (m.detach(), v.detach()) for n, (m, v) in stats.items()}
    return SimulatedUpdate(update, stats)


def invert_update(
    model: nn.Module,
    target_update: list[torch.Tensor],
    labels: torch.Tensor,
    input_shape: tuple[int, ...],
    plan: Sequence[torch.Tensor],
    client_lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    steps: int = 2000,
    lr: float = 0.1,
    tv_weight: float = 1e-4,
    seed: int = 0,
    bn_mode: str = "train",
    bounds: tuple[float, float] | None = (0.0, 1.0),
    bn_buffers: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    bn_weight: float = 0.0,
    restarts: int = 1,
) -> InversionResult:
    """Reconstruct a client's local dataset from its multi-step upload (Geiping et al.,
    NeurIPS 2020, §5 "Inverting multiple local updates").

    The attacker knows the model it sent, the client's SGD settings (``client_lr``,
    ``momentum``, ``weight_decay``), the number of images ``len(labels)`` and which of them
    form each local batch, in order (``plan``; so it knows τ = ``len(plan)`` and the batch
    size). For candidate images x̂ it simulates the τ steps (:func:`simulate_update`) and
    minimizes ``1 − cos(Δ̂(x̂), target_update) + tv_weight · TV(x̂)`` with the optimizer of
    :func:`invert_gradients` (same start points per seed and restart). With ``bn_buffers``
    (the running (mean, variance) the client uploaded, per BatchNorm module name) and
    ``bn_weight > 0`` it adds ``bn_weight · Σ (‖μ̂ − μ‖ + ‖σ̂² − σ²‖) / momentum`` between the
    simulated and uploaded buffers — for one step exactly the batch-statistics prior of
    :func:`invert_gradients`.

    ``target_update`` is ``w_sent − w_after`` per trainable parameter, in
    ``model.parameters()`` order; image i of the reconstruction has label ``labels[i]``.
    """
    num_images = len(labels)
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if len(plan) == 0:
        raise ValueError("plan has no local step to simulate")
    if any(int(idx.max()) >= num_images or int(idx.min()) < 0 for idx in plan):
        raise ValueError(f"plan indexes images beyond the {num_images} labelled ones")
    probe, params, target, labels, shape = _attack_setup(
        model, bn_mode, target_update, "target_update", labels, num_images, input_shape,
        tv_weight)
    device = params[0].device
    prior = dict(bn_buffers or {}) if bn_weight > 0 and bn_mode == "train" else {}
    modules = dict(probe.named_modules())
    missing = [name for name in prior if name not in modules]
    if missing:
        raise ValueError(f"bn_buffers name modules the model lacks: {', '.join(missing)}")
    prior = {k: (m.to(device).float(), v.to(device).float()) for k, (m, v) in prior.items()}
    scale = {k: modules[k].momentum or 1.0 for k in prior}

    def objective(x: torch.Tensor) -> torch.Tensor:
        sim = _simulate(probe, x, labels, plan, client_lr, momentum, weight_decay,
                        create_graph=True, running=tuple(prior))
        cost = _cosine_distance(sim.update, target)
        if tv_weight > 0:
            cost = cost + tv_weight * total_variation(x)
        if prior:
            cost = cost + bn_weight * sum(
                ((sim.running[k][0] - m).norm() + (sim.running[k][1] - v).norm()) / scale[k]
                for k, (m, v) in prior.items())
        return cost

    return best_of_restarts(
        lambda r: _optimize(objective, shape, device, steps, lr, bounds,
                            _init_generator(seed, r)),
        restarts)


def _batch_stats_hook(name: str, seen: dict):
    """Forward hook storing :func:`_input_stats` of a module's input in ``seen[name]``."""

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen[name] = _input_stats(inputs[0])

    return hook


def _input_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance of ``h`` over every dimension but the channel
    one (what BatchNorm's running statistics track)."""
    var, mean = torch.var_mean(h, dim=[0, *range(2, h.dim())], correction=1)
    return mean, var


def _as_images(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu().double()
    if t.ndim == 3:  # (B, H, W): one channel
        t = t[:, None]
    if t.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W) or (B, H, W), got shape {tuple(t.shape)}")
    return t


def psnr(x: torch.Tensor, x_ref: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, computed per image and averaged over the batch.

    ``10 log10(data_range² / MSE)`` with ``data_range`` the width of the pixel interval
    (1.0 for [0, 1]); an exact copy gives infinity.
    """
    a, b = _as_images(x), _as_images(x_ref)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    with np.errstate(divide="ignore"):
        per_image = 10 * np.log10(data_range**2 / mse.numpy())
    return float(per_image.mean())


def _ssim_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    x: torch.Tensor,
    x_ref: torch.Tensor,
    data_range: float = 1.0,
    win_size: int | None = None,
    sigma: float = 1.5,
) -> float:
    """Structural similarity (Wang et al. 2004), per image and channel, averaged.

    Gaussian window (σ = 1.5), constants C1 = (0.01·L)², C2 = (0.03·L)² with L = ``data_range``
    (the width of the pixel interval), population statistics, and the mean over 'valid'
    window positions (scikit-image's ``gaussian_weights=True`` setting). The window is 11
    wide, or for images smaller than 11 pixels the largest odd size ≤ min(7, H, W).
    """
    a, b = _as_images(x), _as_images(x_ref)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    _, channels, height, width = a.shape
    if win_size is None:
        side = min(height, width)
        win_size = 11 if side >= 11 else min(7, side)
        win_size -= 1 - win_size % 2  # largest odd size that fits
    if win_size < 1 or win_size % 2 == 0 or win_size > min(height, width):
        raise ValueError(f"win_size must be odd and at most the image size, got {win_size}")
    window = _ssim_window(win_size, sigma).expand(channels, 1, win_size, win_size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return float(s_map.flatten(1).mean(dim=1).mean())


def match_reconstructions(
    true: torch.Tensor, recon: torch.Tensor
) -> tuple[torch.Tensor, np.ndarray]:
    """Reorder ``recon`` so reconstruction i pairs with true image i, minimizing total MSE.

    Gradients of a batch do not reveal its order, so, as breaching does, images are matched
    to reconstructions optimally (Hungarian algorithm, ``linear_sum_assignment``) before any
    metric. Returns the reordered reconstructions and the permutation applied.
    """
    a, b = _as_images(true), _as_images(recon)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    cost = torch.cdist(a.flatten(1), b.flatten(1)).pow(2) / a[0].numel()
    _, order = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(recon)[torch.as_tensor(order)], order


def image_metrics(
    true: torch.Tensor, recon: torch.Tensor, data_range: float = 1.0
) -> dict[str, float]:
    """MSE, PSNR and SSIM of reconstructions after optimal matching (see
    :func:`match_reconstructions`); ``data_range`` is the width of the pixel interval."""
    matched, _ = match_reconstructions(true, recon)
    a, b = _as_images(true), _as_images(matched)
    return {
        "mse": float((a - b).pow(2).mean()),
        "psnr": psnr(a, b, data_range),
        "ssim": ssim(a, b, data_range),
    }


def save_image_grid(
    true: torch.Tensor,
    recon: torch.Tensor,
    path: str | Path,
    bounds: tuple[float, float] | None = None,
) -> Path:
    """Write a PNG with the true images in the top row and reconstructions below.

    Pixels are shown on the scale ``bounds`` (default: the true images' min and max), so both
    rows share one colour scale. One-channel images are drawn in grey, three-channel in RGB.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = _as_images(true), _as_images(recon)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    lo, hi = bounds if bounds is not None else (float(a.min()), float(a.max()))
    span = hi - lo if hi > lo else 1.0
    path = Path(path)
    make_folder(path.parent)
    n = a.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n + 0.8, 2.8), squeeze=False)
    try:
        for row, (imgs, name) in enumerate(((a, "true"), (b, "reconstructed"))):
            for i in range(n):
                img = ((imgs[i] - lo) / span).clamp(0, 1).permute(1, 2, 0).numpy()
                ax = axes[row, i]
                if img.shape[2] == 1:
                    ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(img)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[row, 0].set_ylabel(name, fontsize=8)
        fig.tight_layout()
        save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return path
