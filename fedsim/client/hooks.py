"""Client hooks: client-side behaviour a strategy asks for through its train config.

A strategy names the hooks it needs in the ``client-hooks`` config entry (comma-separated);
the ClientApp looks each up here. A hook may also declare a config key that switches it on
by itself (``activated_by``), so Flower's unmodified FedProx — which only sends
``proximal-mu`` — gets a real proximal term on the client.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn

from fedsim.registry import Registry


@dataclass
class HookContext:
    """What a hook may read or change for one client update."""

    client_id: int
    config: ConfigRecord  # the train config the strategy sent
    state: RecordDict  # the client's persistent state (Flower Context.state or the store)


class ClientHook:
    """Base class: every method is optional; defaults do nothing."""

    #: a train-config key whose presence activates this hook without naming it
    activated_by: str | None = None

    def __init__(self, ctx: HookContext) -> None:
        self.ctx = ctx

    def on_receive(self, model: nn.Module) -> None:
        """Called after the global arrays are loaded, before local training."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to each minibatch's loss (e.g. FedProx's proximal term)."""
        return None

    def after_step(self, model: nn.Module, lr: float) -> None:
        """Called after each optimizer step (e.g. SCAFFOLD's gradient correction)."""

    def on_reply(
        self, model: nn.Module, arrays: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Edit the arrays the client uploads (e.g. drop local layers); returns them."""
        return arrays


CLIENT_HOOKS: Registry[type[ClientHook]] = Registry("client hook")


@CLIENT_HOOKS.register("proximal")
class ProximalHook(ClientHook):
    """FedProx (Li et al., MLSys 2020): add (mu/2)·||w − w_global||² to the local loss."""

    activated_by = "proximal-mu"

    def on_receive(self, model: nn.Module) -> None:
        self.mu = float(self.ctx.config.get("proximal-mu", 0.0))
        self.anchor = [p.detach().clone() for p in model.parameters()]

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.mu == 0.0:
            return None
        sq = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), self.anchor))
        return 0.5 * self.mu * sq


def hooks_for(ctx: HookContext) -> list[ClientHook]:
    """Instantiate the hooks the config asks for, explicitly or through an activating key."""
    names = [n.strip() for n in str(ctx.config.get("client-hooks", "")).split(",") if n.strip()]
    for name in CLIENT_HOOKS:
        cls = CLIENT_HOOKS.get(name)
        if cls.activated_by and cls.activated_by in ctx.config and name not in names:
            names.append(name)
    return [CLIENT_HOOKS.get(n, key="client-hooks")(ctx) for n in names]
