"""FedBN (Li et al., ICLR 2021): normalization layers stay on the clients.

Every normalization layer's parameters *and* buffers (BN, IN, GN, LN, hybrid — selected by
module type) are kept by each client across rounds and never uploaded; the server averages
the rest. Each client's own model (global arrays + its local layers) is what its
personalized accuracy measures.
"""

from __future__ import annotations

from torch import nn

from fedsim.client.hooks import CLIENT_HOOKS, LocalArraysHook, norm_keys
from fedsim.server.dp_analysis import dp_fedavg
from fedsim.server.strategies import STRATEGIES
from strategies.common import LocalArraysFedAvg


@CLIENT_HOOKS.register("fedbn")
class FedBNHook(LocalArraysHook):
    """Keeps every normalization layer (affine parameters and statistics) on the client."""

    state_key = "fedbn.local"

    def local_keys(self, model: nn.Module) -> list[str]:
        return norm_keys(model)


@dp_fedavg(statistics_local=True)  # the server averages the uploads; norm layers stay local
@STRATEGIES.register("fedbn")
class FedBN(LocalArraysFedAvg):
    """FedAvg over everything but normalization layers, which each client keeps (FedBN)."""

    client_hooks = ("fedbn",)
    personal_hooks = ("fedbn",)
