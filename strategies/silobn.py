"""SiloBN (Andreux et al., 2020): share BN affine parameters, keep BN statistics local.

Each client keeps the buffers of its batch-statistics normalization layers (running mean,
running variance, batch counter) across rounds and never uploads them — activation
statistics never leave the site; the affine parameters are averaged with everything else.
With per-sample norms (GN, LN, IN), which have no statistics, SiloBN is FedAvg.
"""

from __future__ import annotations

from torch import nn

from fedsim.client.hooks import CLIENT_HOOKS, LocalArraysHook, norm_statistics_keys
from fedsim.server.dp_analysis import dp_fedavg
from fedsim.server.strategies import STRATEGIES
from strategies.common import LocalArraysFedAvg


@CLIENT_HOOKS.register("silobn")
class SiloBNHook(LocalArraysHook):
    """Keeps the running statistics of normalization layers on the client."""

    state_key = "silobn.local"

    def local_keys(self, model: nn.Module) -> list[str]:
        return norm_statistics_keys(model)


@dp_fedavg(statistics_local=True)  # the server averages the uploads; statistics stay local
@STRATEGIES.register("silobn")
class SiloBN(LocalArraysFedAvg):
    """FedAvg that never sees BN running statistics; each client keeps its own (SiloBN)."""

    client_hooks = ("silobn",)
    personal_hooks = ("silobn",)
