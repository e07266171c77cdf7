"""Sample-level DP-SGD on a client (Abadi et al., CCS 2016): its schedule, its accounting,
and what refuses it.

The mechanism — Poisson batches, per-sample clipping, canaries, noise — is a gradient rule
of the one step loop (:mod:`fedsim.models.dp_sgd`), so DP-SGD runs with every client hook
and on every backend: one client at a time (:func:`train_dpsgd`, the ClientApp) and in
vectorized cohorts, where per-sample gradients nest inside the ``vmap`` over clients
(:mod:`fedsim.engine.vectorized`). Client hooks' loss terms and gradient transforms
(FedProx's proximal term, SCAFFOLD's correction) see only the parameters, not the data:
their gradient is added to the privatized one, unclipped — post-processing.

A round takes ``client.local_steps`` steps if > 0, else ``client.epochs × ceil(n / batch_size)``,
at rate ``q = min(1, batch_size / n)`` (``n``: the client's training samples). The client's
ε composes the Poisson-subsampled Gaussian mechanism (rate q, σ) over all steps it has taken
in the rounds it joined (:func:`client_epsilon`). Not covered: the metrics a client reports
in the clear (training loss and accuracy, its number of samples).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedsim.client.hooks import ClientHook
from fedsim.client.train import start_terms, train_on_module
from fedsim.config import ClientConfig
from fedsim.models.dp_sgd import DPSGD, PoissonBatches
from fedsim.models.sgd_step import TrainResult

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


def poisson_plan(n: int, cfg: ClientConfig, noise_multiplier: float,
                 generator: torch.Generator, canaries: torch.Tensor | None = None,
                 max_steps: int | None = None) -> PoissonBatches:
    """A client's DP-SGD round (:class:`fedsim.models.dp_sgd.PoissonBatches`): its
    :func:`plan`, at most ``max_steps`` steps (a hook's cap), batches, noise and canaries
    from ``generator``."""
    schedule = plan(n, cfg)
    steps = schedule.steps if max_steps is None else min(schedule.steps, max_steps)
    return PoissonBatches(n, schedule.sampling_rate, steps, generator, noise_multiplier,
                          canaries)


def train_dpsgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ClientConfig,
                noise_multiplier: float, generator: torch.Generator,
                hooks: Sequence[ClientHook] = (), canaries: torch.Tensor | None = None
                ) -> TrainResult:
    """One round of DP-SGD on (x, y) in place, one client on its module; ``generator`` draws
    the Poisson batches, the canaries (``(k, dim)`` directions, an audit's,
    :mod:`fedsim.canaries`) and the noise. Returns the mean loss / accuracy over
    sampled examples."""
    terms = start_terms(model, hooks)
    schedule = poisson_plan(len(x), cfg, noise_multiplier, generator, canaries,
                            terms.max_steps)
    return train_on_module(model, x, y, cfg, schedule, DPSGD(cfg.dp.max_grad_norm), hooks,
                           terms)


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
