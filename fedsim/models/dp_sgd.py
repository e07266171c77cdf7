"""DP-SGD's gradient (Abadi et al., CCS 2016, the mechanism Opacus implements), as a gradient
rule of the one step loop (:mod:`fedsim.models.local_sgd`), on any backend.

Each step of a client's round:

1. **Poisson sampling** (:class:`PoissonBatches`): every local sample joins the step's batch
   independently with probability ``q``, drawn from the client's derived generator. A batch
   may be empty; the step still adds noise (that is the mechanism the accountant analyses).
2. **Per-sample gradients** from the backend: ``vmap(grad(loss of one sample))`` over the
   batch through ``functional_call`` — one client's module, or, in a cohort, nested inside
   the ``vmap`` over clients (a step's batches padded to the largest with samples of
   weight 0). Each sample is its own batch of one, which is exact for per-sample norms (GN,
   IN, LN, none); BatchNorm is refused before training (a sample's output depends on its
   batch peers).
3. **Clip** each sample's whole gradient (all parameters together) to L2 norm ≤ C with
   Opacus's factor ``min(1, C / (‖g‖ + 1e-6))``; **sum** (:func:`clip_and_sum`).
4. **Canaries** (a one-run audit's gradient canaries, Steinke, Nasr & Jagielski 2023): each
   joins the batch with probability q as a sample whose clipped gradient is C·u
   (:func:`canary_gradients`), added to the sum before the noise.
5. **Noise**: N(0, σ²C²) on every coordinate of the sum, divided by the *expected* batch
   size ``q·n`` (as Opacus does for Poisson batches), so the sensitivity stays C / (q·n)
   (:func:`privatize`). Each client draws its batches, canaries and noise from its own
   generator in that order, step by step, so a client's noise is the same whether it
   trains alone or in a cohort.

Then the loop goes on as for any gradient: the hooks' loss terms (FedProx's proximal term)
add their gradient, unclipped — they see only the parameters, not the data, so that is
post-processing — the hooks' transforms (SCAFFOLD's correction) apply, and the SGD update
(:class:`fedsim.models.sgd_step.SGD`) steps. Torch only; the accounting (ε) is
:mod:`fedsim.client.dpsgd`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import grad, vmap

from fedsim.models.local_sgd import Backend, Step, per_sample_loss
from fedsim.models.sgd_step import Tensors, TrainResult

#: Opacus's stabilizer in the clipping factor C / (‖g‖ + eps)
CLIP_EPS = 1e-6


def poisson_batch(n: int, q: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson sample: each of ``n`` samples kept independently with prob. ``q``."""
    keep = torch.rand(n, generator=generator, device=generator.device) < q
    return keep.nonzero().squeeze(1)


def per_sample_grads(model: nn.Module, params: dict[str, torch.Tensor],
                     buffers: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-sample gradients of the cross-entropy, ``{name: (B, *shape)}``, with each sample's
    loss ``(B,)`` and logits ``(B, classes)``. Each sample runs through the model alone."""
    grads, (losses, logits) = vmap(grad(per_sample_loss(model), has_aux=True),
                                   in_dims=(None, None, 0, 0))(params, buffers, x, y)
    return grads, losses, logits


def per_sample_norms(grads: dict[str, torch.Tensor], lead: int = 1) -> torch.Tensor:
    """Each sample's gradient norm over all parameters together: shape ``(B,)`` for one
    client's ``(B, ...)`` gradients, ``(m, B)`` for members' ``(m, B, ...)`` (``lead=2``)."""
    return torch.cat([g.flatten(lead) for g in grads.values()], dim=lead).norm(dim=lead)


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus's per-sample factors ``min(1, C / (‖g‖ + 1e-6))``: ``factor·‖g‖ < C`` always."""
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def clip_and_sum(grads: dict[str, torch.Tensor], max_grad_norm: float
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clip each sample's gradient (over all parameters) to norm ≤ ``max_grad_norm`` and sum
    over samples; returns the sums and the per-sample norms before clipping. One client's
    ``(B, ...)`` gradients."""
    summed, norms = clip_and_sum_members({k: g.unsqueeze(0) for k, g in grads.items()},
                                         max_grad_norm)
    return {k: s[0] for k, s in summed.items()}, norms[0]


def clip_and_sum_members(grads: dict[str, torch.Tensor], max_grad_norm: float,
                         weight: torch.Tensor | None = None
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`clip_and_sum` for ``m`` members' ``(m, B, ...)`` gradients at once: sums
    ``(m, ...)`` and norms ``(m, B)``; ``weight`` ``(m, B)`` (0 for padding) leaves padded
    samples out of the sums."""
    norms = per_sample_norms(grads, lead=2)
    factor = clip_factors(norms, max_grad_norm)
    if weight is not None:
        factor = factor * weight
    summed = {k: torch.einsum("mb,mb...->m...", factor.to(g.dtype), g) for k, g in grads.items()}
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
    noise = draw_noise(summed, noise_multiplier * max_grad_norm, generator)
    return {k: (s + noise[k]) / expected_batch for k, s in summed.items()}


def draw_noise(like: dict[str, torch.Tensor], std: float, generator: torch.Generator
               ) -> dict[str, torch.Tensor]:
    """:func:`gaussian_noise`, or zeros without a draw where ``std`` is 0."""
    if std > 0:
        return gaussian_noise(like, std, generator)
    return {k: torch.zeros_like(t) for k, t in like.items()}


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


@dataclass
class PoissonBatches:
    """One client's DP-SGD round: ``steps`` Poisson batches of ``n`` samples at rate
    ``rate``, and the noise (σ = ``noise_multiplier``) and canaries each step adds, all
    drawn from ``generator`` step by step: the batch, then the canaries, then the noise."""

    n: int
    rate: float
    steps: int
    generator: torch.Generator
    noise_multiplier: float
    canaries: torch.Tensor | None = None  # (k, dim) unit directions this client holds

    @property
    def expected_batch(self) -> float:
        return self.rate * self.n

    def batch(self, t: int) -> torch.Tensor:
        return poisson_batch(self.n, self.rate, self.generator)

    def canary_sum(self, like: Tensors, max_grad_norm: float) -> Tensors | None:
        """This step's canary gradients (None without canaries; no draw then)."""
        if self.canaries is None or not len(self.canaries):
            return None
        return canary_gradients(self.canaries, like, self.rate, max_grad_norm, self.generator)

    def noise(self, like: Tensors, max_grad_norm: float) -> Tensors:
        """This step's N(0, σ²C²) per coordinate (:func:`draw_noise`)."""
        return draw_noise(like, self.noise_multiplier * max_grad_norm, self.generator)


class DPSGD:
    """DP-SGD as a per-sample gradient rule of the step loop (see the module docstring):
    the members' clipped per-sample sums, their canaries and noise, over their expected
    batch sizes, plus the hooks' loss-term gradients. Members' plans are
    :class:`PoissonBatches`."""

    def __init__(self, max_grad_norm: float) -> None:
        self.max_grad_norm = max_grad_norm

    def gradients(self, backend: Backend, step: Step) -> Tensors:
        c = self.max_grad_norm
        like = backend.like()
        m = len(step.members)
        if any(step.sizes):
            per_sample, weight = backend.sample_grads(step)
            summed, _ = clip_and_sum_members(per_sample, c, weight)
        else:  # every batch of the step is empty: the noise alone
            summed = {k: t.new_zeros((m, *t.shape)) for k, t in like.items()}
        plans: list[PoissonBatches] = backend.step_plans(step)  # type: ignore[assignment]
        canaries = [p.canary_sum(like, c) for p in plans]  # each client: canaries, then noise
        noise = [p.noise(like, c) for p in plans]
        expected = torch.tensor([p.expected_batch for p in plans], dtype=torch.float64)
        out = {}
        for k, s in summed.items():
            if any(extra is not None for extra in canaries):
                s = s + torch.stack([torch.zeros_like(like[k]) if extra is None else extra[k]
                                     for extra in canaries])
            scale = expected.to(device=s.device, dtype=s.dtype).view(m, *[1] * (s.dim() - 1))
            out[k] = (s + torch.stack([z[k] for z in noise])) / scale
        grads = backend.unstack(out)
        terms = backend.term_grads(step)  # data-independent (post-processing): unclipped
        if terms:
            grads = {k: g if k not in terms else terms[k] + g for k, g in grads.items()}
        return grads

    def result(self, loss_sum: float, hit_count: int, seen: int, n: int, steps: int
               ) -> TrainResult:
        """Loss and accuracy over the sampled examples; every Poisson batch empty: 0 (NaN
        would make the server reject the update), NaN only without data."""
        if seen == 0:
            nan = float("nan") if n == 0 else 0.0
            return TrainResult(nan, nan, n, steps)
        return TrainResult(loss_sum / seen, hit_count / seen, n, steps)
