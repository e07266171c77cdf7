"""Simulated client failures: dropouts, crashes mid-training, stragglers past a deadline.

System heterogeneity as seen in real cross-device federations (Bonawitz et al., "Towards
Federated Learning at Scale", MLSys 2019: devices drop out, a round deadline cuts off slow
ones; Li et al., FedProx, MLSys 2020). The server decides every fate here from derived
randomness — ``(seed, "failures", round, client)`` — so failures are reproducible, the same
on every engine and the same after ``--resume``. A crash is a real exception raised inside
the ClientApp (the ``crash`` client hook), so it exercises the engines' error paths; the
ClientApp turns any exception into an error reply
(:func:`fedsim.client.messages.error_reply`) so a failing client never kills or hangs a run.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedsim.client.hooks import CLIENT_HOOKS, ClientHook
from fedsim.config import FailuresConfig
from fedsim.models.sgd_step import Trained
from fedsim.rng import numpy_rng

#: train-config key that makes a client crash at that local step (set by the server)
CRASH_KEY = "fedsim-crash-at"
#: a crash happens after 1..CRASH_WINDOW local steps (or at the end of a shorter training)
CRASH_WINDOW = 4


class SimulatedCrash(RuntimeError):
    """The failure ``[failures] crash`` injects into a client's local training."""


@dataclass(frozen=True)
class Fate:
    """What happens to one sampled client in one round attempt."""

    dropout: bool  # the client never answers
    crash_at: int  # local step at which it raises (0: it does not crash)


def client_fate(cfg: FailuresConfig, seed: int, rnd: int, cid: int, attempt: int = 0) -> Fate:
    """Draw the fate of client ``cid`` in round ``rnd`` (``attempt`` > 0: a retried round)."""
    if cfg.dropout == 0 and cfg.crash == 0:
        return Fate(False, 0)
    retry = ("retry", attempt) if attempt else ()
    u = numpy_rng(seed, "failures", rnd, cid, *retry).random(3)
    dropout = bool(u[0] < cfg.dropout)
    crash = not dropout and bool(u[1] < cfg.crash)
    return Fate(dropout, 1 + int(u[2] * CRASH_WINDOW) if crash else 0)


def is_straggler(cfg: FailuresConfig, seed: int, cid: int) -> bool:
    """Whether ``cid`` is one of the slow clients (fixed per client: slow devices stay slow)."""
    if cfg.straggler == 0:
        return False
    return bool(numpy_rng(seed, "failures", "straggler", cid).random() < cfg.straggler)


def simulated_seconds(cfg: FailuresConfig, seed: int, cid: int, steps: int) -> float:
    """Simulated duration of one update: local steps × ``step_seconds`` (× ``slowdown``)."""
    slow = cfg.slowdown if is_straggler(cfg, seed, cid) else 1.0
    return steps * cfg.step_seconds * slow


@CLIENT_HOOKS.register("crash")
class CrashHook(ClientHook):
    """Raises :class:`SimulatedCrash` after the local step named by the ``fedsim-crash-at`` key.

    The client trains at most ``at`` steps (``max_steps``), then ``after_train`` raises: the
    same step count and message whether it runs alone or in a vectorized cohort, where only
    this client fails."""

    activated_by = CRASH_KEY

    def max_steps(self) -> int | None:
        return int(self.ctx.config[CRASH_KEY])

    def after_train(self, model: nn.Module, trained: Trained) -> None:
        raise SimulatedCrash(
            f"client {self.ctx.client_id} crashed (simulated) after {trained.steps} local steps"
        )
