"""FixBN-style training (Zhong et al., 2023): freeze BN statistics after a warm-up.

For the first ``warmup`` rounds this is FedAvg (BN running statistics are averaged like
every other array). From round ``warmup + 1`` on, the global running statistics are frozen:
clients normalise with them *during training* too (BN layers in eval mode, so no batch
statistics and no train/test discrepancy), do not upload them, and the server keeps them
unchanged. Models without batch statistics (GN, LN, IN) train exactly as with FedAvg.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedsim.client.hooks import CLIENT_HOOKS, ClientHook, request_hooks
from fedsim.models.norm import has_running_statistics, norm_layers, norm_statistics_keys
from fedsim.server.dp_analysis import dp_fedavg
from fedsim.server.strategies import STRATEGIES
from strategies.common import keep_absent


@CLIENT_HOOKS.register("fixbn")
class FixBNHook(ClientHook):
    """Train with the received (frozen) running statistics; do not upload them."""

    def before_train(self, model: nn.Module) -> None:
        for _, layer in norm_layers(model):
            if has_running_statistics(layer):
                layer.eval()  # normalise with running statistics, and leave them unchanged

    def on_reply(self, model: nn.Module, arrays: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        frozen = set(norm_statistics_keys(model))
        return {k: v for k, v in arrays.items() if k not in frozen}


@dp_fedavg(why_not="after warmup every client normalizes with the BN statistics averaged "
           "without clipping or noise, so one client's data reaches the other clients' later "
           "updates outside the noised model: the per-round sensitivity C/m does not hold")
@STRATEGIES.register("fixbn")
class FixBN(FedAvg):
    """FedAvg, then BN statistics frozen to the global ones after ``warmup`` rounds."""

    def __init__(self, warmup: int = 5, **kwargs) -> None:
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0 rounds, got {warmup}")
        super().__init__(**kwargs)
        self.warmup = warmup

    def frozen(self, server_round: int) -> bool:
        """Whether BN statistics are frozen in ``server_round``."""
        return server_round > self.warmup

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays
        if self.frozen(server_round):
            request_hooks(config, "fixbn")
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.frozen(server_round):
            arrays = keep_absent(arrays, self.current_arrays)
        return arrays, metrics
