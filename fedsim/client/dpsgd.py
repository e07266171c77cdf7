"""Sample-level DP-SGD on one client (Abadi et al., CCS 2016), the mechanism Opacus implements.

Each step of a round:

1. **Poisson sampling**: every local sample joins the step's batch independently with
   probability ``q = min(1, batch_size / n)`` (``n``: the client's training samples), drawn
   from the client's derived generator. A batch may be empty; the step still adds noise
   (that is the mechanism the accountant analyses).
2. **Per-sample gradients** with ``torch.func``: ``vmap(grad(loss of one sample))`` over the
   batch, through ``functional_call`` on the model's parameters and buffers. Each sample is
   its own batch of one, which is exact for per-sample norms (GN, IN, LN, none); BatchNorm
   is refused before training (a sample's output depends on its batch peers).
3. **Clip** each sample's whole gradient (all parameters together) to L2 norm ≤ C
   (``max_grad_norm``), with Opacus's factor ``min(1, C / (‖g‖ + 1e-6))``; **sum**.
4. **Noise**: add N(0, σ²C²) to every coordinate of the sum and divide by the *expected*
   batch size ``q·n`` (as Opacus does for Poisson batches), so the sensitivity stays C / (q·n).
5. **Step**: the client computation's SGD update (:class:`fedsim.client.step.SGD`,
   ``torch.optim.SGD``'s rule) with the client's lr, momentum and weight decay, as in
   :func:`fedsim.client.train.train_local`. Client hooks' loss terms and gradient transforms
   (FedProx's proximal term, SCAFFOLD's correction) see only the parameters, not the data:
   their gradient is added to the privatized one, unclipped — post-processing, like every
   other hook method. DP-SGD runs one client at a time only (``engine.vectorize`` refuses it
   before training).

A round takes ``client.local_steps`` steps if > 0, else ``client.epochs × ceil(n / batch_size)``.
The client's ε composes the Poisson-subsampled Gaussian mechanism (rate q, σ) over all steps
it has taken in the rounds it joined (:func:`client_epsilon`). Not covered: the metrics a
client reports in the clear (training loss and accuracy, its number of samples).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedsim.client.hooks import ClientHook
from fedsim.client.step import SGD, HookTerms, Trained, hook_loss, set_modes, transform_grads
from fedsim.client.train import TrainResult
from fedsim.config import ClientConfig

#: Opacus's stabilizer in the clipping factor C / (‖g‖ + eps)
CLIP_EPS = 1e-6

#: why DP-SGD refuses a norm layer with batch statistics (``{norm}``: model.norm), as Opacus does
BATCH_NORM_REFUSAL = (
    "[client.dp] (DP-SGD) cannot train model.norm = {norm!r}: a sample's output depends on the "
    "other samples in its batch through the batch statistics, so clipping each sample's "
    "gradient does not bound its influence on the update; use model.norm = \"gn\" (or \"in\", "
    "\"ln\")")

#: the client-state key holding a client's DP-SGD steps so far
STATE_KEY = "dpsgd"

#: reply-metric keys (read by :mod:`fedsim.server.client_dp`)
EPSILON_METRIC = "dp_epsilon"
NOISE_METRIC = "dp_noise_multiplier"
RATE_METRIC = "dp_sampling_rate"
STEPS_METRIC = "dp_steps"


@dataclass(frozen=True)
class DPSGDPlan:
    """The DP-SGD schedule of one client: sampling rate and steps per round."""

    sampling_rate: float  # q = min(1, batch_size / n)
    steps: int  # per round: local_steps, or epochs * ceil(n / batch_size)


def plan(n: int, cfg: ClientConfig) -> DPSGDPlan:
    """The Poisson rate and the steps per round of a client with ``n`` training samples."""
    if n <= 0:
        return DPSGDPlan(0.0, 0)
    q = min(1.0, cfg.batch_size / n)
    steps = cfg.local_steps if cfg.local_steps > 0 else cfg.epochs * math.ceil(n / cfg.batch_size)
    return DPSGDPlan(q, steps)


def poisson_batch(n: int, q: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson sample: each of ``n`` samples kept independently with prob. ``q``."""
    keep = torch.rand(n, generator=generator, device=generator.device) < q
    return keep.nonzero().squeeze(1)


def per_sample_grads(model: nn.Module, params: dict[str, torch.Tensor],
                     buffers: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-sample gradients of the cross-entropy, ``{name: (B, *shape)}``, with each sample's
    loss ``(B,)`` and logits ``(B, classes)``. Each sample runs through the model alone."""

    def loss_one(p, b, xi, yi):
        logits = functional_call(model, (p, b), (xi.unsqueeze(0),))
        loss = F.cross_entropy(logits, yi.unsqueeze(0))
        return loss, (loss.detach(), logits.squeeze(0).detach())

    grads, (losses, logits) = vmap(grad(loss_one, has_aux=True), in_dims=(None, None, 0, 0))(
        params, buffers, x, y)
    return grads, losses, logits


def per_sample_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each sample's gradient norm over all parameters together, ``(B,)``."""
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1).norm(dim=1)


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus's per-sample factors ``min(1, C / (‖g‖ + 1e-6))``: ``factor·‖g‖ < C`` always."""
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def clip_and_sum(grads: dict[str, torch.Tensor], max_grad_norm: float
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clip each sample's gradient (over all parameters) to norm ≤ ``max_grad_norm`` and sum
    over samples; returns the sums and the per-sample norms before clipping."""
    norms = per_sample_norms(grads)
    factor = clip_factors(norms, max_grad_norm)
    summed = {k: torch.einsum("b,b...->...", factor.to(g.dtype), g) for k, g in grads.items()}
    return summed, norms


def gaussian_noise(like: dict[str, torch.Tensor], std: float, generator: torch.Generator
                   ) -> dict[str, torch.Tensor]:
    """N(0, std²) for every coordinate of ``like``'s tensors, drawn on ``generator``'s device
    (the CPU: a seed gives the same noise on every device) and moved to the tensors' device
    in one copy per dtype, not one per tensor (on the CPU nothing moves).

    The draws stay one ``torch.normal`` per tensor, in ``like``'s order: one draw for all
    tensors would change the stream, since the CPU kernel turns uniforms into normals in
    blocks of 16 and redraws the last 16 of a tensor whose size is not a multiple of 16
    (below 16, one value at a time), so the values depend on where each tensor ends.
    """
    host = generator.device
    noise = {k: torch.normal(0.0, std, t.shape, generator=generator, device=host,
                             dtype=t.dtype) for k, t in like.items()}
    groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for k, t in like.items():
        if t.device != host:
            groups.setdefault((t.dtype, t.device), []).append(k)
    for (_, device), keys in groups.items():  # one host-to-device copy per group
        flat = torch.cat([noise[k].flatten() for k in keys]).to(device)
        for k, part in zip(keys, flat.split([noise[k].numel() for k in keys])):
            noise[k] = part.view(like[k].shape)
    return noise


def privatize(summed: dict[str, torch.Tensor], noise_multiplier: float, max_grad_norm: float,
              expected_batch: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``(sum + N(0, σ²C²)) / expected_batch`` per coordinate; noise from ``generator``
    (:func:`gaussian_noise`)."""
    std = noise_multiplier * max_grad_norm
    if std > 0:
        noise = gaussian_noise(summed, std, generator)
    else:
        noise = {k: torch.zeros_like(s) for k, s in summed.items()}
    return {k: (s + noise[k]) / expected_batch for k, s in summed.items()}


def canary_gradients(canaries: torch.Tensor, params: dict[str, torch.Tensor],
                     sampling_rate: float, max_grad_norm: float,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The step's sum of gradient canaries: each of the ``(k, dim)`` unit ``canaries`` joins
    the Poisson batch with probability q, as a sample whose clipped gradient is C·u (Steinke,
    Nasr & Jagielski 2023, white-box canaries), laid out like ``params`` (flattened in
    order)."""
    joins = torch.rand(len(canaries), generator=generator, device=generator.device)
    joins = (joins < sampling_rate).to(device=canaries.device, dtype=canaries.dtype)
    flat = max_grad_norm * (joins @ canaries)
    sizes = [p.numel() for p in params.values()]
    return {k: part.view(p.shape).to(p.dtype)
            for (k, p), part in zip(params.items(), flat.split(sizes), strict=True)}


def train_dpsgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ClientConfig,
                noise_multiplier: float, generator: torch.Generator,
                hooks: Sequence[ClientHook] = (), canaries: torch.Tensor | None = None
                ) -> TrainResult:
    """One round of DP-SGD on (x, y) in place (see the module docstring); ``generator`` draws
    the Poisson batches and the noise. Returns the mean loss / accuracy over sampled examples.

    The hooks' terms, transforms and step cap and the SGD update are those of
    :mod:`fedsim.client.step`, as in :func:`fedsim.client.train.train_local`; only the
    gradient of the data loss differs (clipped per sample, noised). ``canaries``: the
    client's gradient canaries ``(k, dim)``, added to each step's clipped sum before the
    noise (:func:`canary_gradients`; an audit's, :mod:`fedsim.canaries`)."""
    set_modes(model, hooks)
    all_params = dict(model.named_parameters())
    trainable = {k: p for k, p in all_params.items() if p.requires_grad}
    terms = HookTerms(hooks, {k: p.detach().clone() for k, p in all_params.items()}) \
        if hooks else None
    sgd, momentum = SGD.of(cfg), {}
    n = len(x)
    schedule = plan(n, cfg)
    steps = schedule.steps
    if terms is not None and terms.max_steps is not None:
        steps = min(steps, terms.max_steps)
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    total_loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    seen = 0
    for _ in range(steps):
        idx = poisson_batch(n, schedule.sampling_rate, generator).to(x.device)
        params = {k: p.detach() for k, p in trainable.items()}
        if len(idx):
            grads, losses, logits = per_sample_grads(model, params, buffers, x[idx], y[idx])
            summed, _ = clip_and_sum(grads, cfg.dp.max_grad_norm)
            total_loss += losses.double().sum()
            correct += (logits.argmax(1) == y[idx]).sum()
            seen += len(idx)
        else:  # an empty Poisson batch: the noise alone
            summed = {k: torch.zeros_like(p) for k, p in params.items()}
        if canaries is not None and len(canaries):
            extra = canary_gradients(canaries, params, schedule.sampling_rate,
                                     cfg.dp.max_grad_norm, generator)
            summed = {k: summed[k] + extra[k] for k in summed}
        grads = privatize(summed, noise_multiplier, cfg.dp.max_grad_norm,
                          schedule.sampling_rate * n, generator)
        if terms:  # data-independent terms (post-processing): their gradient, unclipped
            extra = hook_loss(terms.active_hooks, all_params, terms.active_states)
            if extra is not None:
                extra_grads = torch.autograd.grad(extra, list(trainable.values()),
                                                  allow_unused=True)
                grads = {k: grads[k] if g is None else g + grads[k]
                         for k, g in zip(trainable, extra_grads)}
            grads = transform_grads(terms.active_hooks, grads, terms.active_states)
        sgd.update(trainable, grads, momentum, in_place=True)
    for hook in hooks:
        hook.after_train(model, Trained(steps, cfg.lr))
    if seen == 0:  # every Poisson batch was empty (or no data): nothing to report on
        nan = float("nan") if n == 0 else 0.0  # NaN would make the server reject the update
        return TrainResult(nan, nan, n, steps)
    return TrainResult(total_loss.item() / seen, correct.item() / seen, n, steps)


# --------------------------------------------------------------------------- accounting


def client_epsilon(noise_multiplier: float, sampling_rate: float, steps: int,
                   delta: float) -> float:
    """ε of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism at rate
    ``sampling_rate`` and noise ``noise_multiplier``, at ``delta`` (the accountant's reported
    method, PLD via dp-accounting)."""
    from fedsim.privacy import accountant  # late: dp_accounting loads only for DP-SGD runs

    return accountant.epsilon_by(accountant.REPORTED, noise_multiplier, sampling_rate, steps,
                                 delta)


@functools.lru_cache(maxsize=1024)
def calibrate_noise(target_epsilon: float, sampling_rate: float, steps: int,
                    delta: float) -> float:
    """The σ whose ε after ``steps`` steps is at most ``target_epsilon`` (dp-accounting's
    calibration on the reported method, on the safe side)."""
    if steps == 0 or sampling_rate == 0:
        return 0.0
    from fedsim.privacy import accountant  # late: dp_accounting loads only for DP-SGD runs

    return accountant.noise_for_epsilon(target_epsilon, sampling_rate, steps, delta)


def noise_multiplier_for(cfg: ClientConfig, rounds: int, n: int) -> float:
    """σ of a client with ``n`` samples: ``client.dp.noise_multiplier``, or calibrated so that
    joining all ``rounds`` rounds (an upper bound on its participation) spends
    ``client.dp.target_epsilon``."""
    if cfg.dp.target_epsilon <= 0:
        return cfg.dp.noise_multiplier
    schedule = plan(n, cfg)
    return calibrate_noise(cfg.dp.target_epsilon, schedule.sampling_rate,
                           schedule.steps * rounds, cfg.dp.delta)
