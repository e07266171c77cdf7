"""FixBN-style training (Zhong et al., 2023): freeze BN statistics after a warm-up.

For the first ``warmup`` rounds this is FedAvg (BN running statistics are averaged like
every other array). From round ``warmup + 1`` on, the global running statistics are frozen:
clients normalise with them *during training* too (BN layers in eval mode, so no batch
statistics and no train/test discrepancy), do not upload them, and the server keeps them
unchanged. Models without batch statistics (GN, LN, IN) train exactly as with FedAvg.

Training with frozen statistics loses BN's invariance to the scale of the weights before
each BN layer, and with it the damping that batch statistics give a step: on a digits
ResNet after 150 rounds at ``client.lr = 0.03`` the loss gradient in the frozen phase was
1.7-4x larger and one step at that rate raised 7 of 10 clients' own minibatch loss (with
the global statistics averaged or computed over the union of the clients' data alike:
``python benchmarks/fixbn_freeze_step.py --set client.lr=0.03 --lrs 0.03``).
``lr_scale`` multiplies each local step's loss gradient in the frozen phase (the step size
of ``client.lr``; weight decay keeps its rate), so the frozen phase can train at a smaller
rate than the warm-up, as the exploration/calibration phases of FixBN suggest.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedsim.client.hooks import CLIENT_HOOKS, ClientHook, HookContext, request_hooks
from fedsim.models.norm import has_running_statistics, norm_layers, norm_statistics_keys
from fedsim.server.dp_analysis import dp_fedavg
from fedsim.server.strategies import STRATEGIES
from strategies.common import keep_absent

#: the train-config key carrying the frozen phase's gradient scale (absent: 1)
LR_SCALE_KEY = "fixbn-lr-scale"


@CLIENT_HOOKS.register("fixbn")
class FixBNHook(ClientHook):
    """Train with the received (frozen) running statistics, each step's loss gradient scaled
    by the config's ``fixbn-lr-scale`` (1 when absent); do not upload the statistics."""

    def __init__(self, ctx: HookContext) -> None:
        super().__init__(ctx)
        self.lr_scale = float(ctx.config.get(LR_SCALE_KEY, 1.0))

    def before_train(self, model: nn.Module) -> None:
        for _, layer in norm_layers(model):
            if has_running_statistics(layer):
                layer.eval()  # normalise with running statistics, and leave them unchanged

    def step_state(self, start) -> torch.Tensor | None:
        """The scale as a step state (a cohort stacks it per client); None when it is 1, so
        an unscaled client's step has no gradient transform at all."""
        if self.lr_scale == 1.0:
            return None
        like = next((t for t in start.values() if t.is_floating_point()), None)
        if like is None:
            return torch.tensor(self.lr_scale)
        # on the parameters' device: a cohort stacks the states into a (clients,) tensor
        return torch.tensor(self.lr_scale, dtype=like.dtype, device=like.device)

    def grad_transform(self, grads: dict[str, torch.Tensor], state: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
        return {name: g * state for name, g in grads.items()}

    def on_reply(self, model: nn.Module, arrays: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        frozen = set(norm_statistics_keys(model))
        return {k: v for k, v in arrays.items() if k not in frozen}


@dp_fedavg(why_not="after warmup every client normalizes with the BN statistics averaged "
           "without clipping or noise, so one client's data reaches the other clients' later "
           "updates outside the noised model: the per-round sensitivity C/m does not hold")
@STRATEGIES.register("fixbn")
class FixBN(FedAvg):
    """FedAvg, then BN statistics frozen to the global ones after ``warmup`` rounds, the
    clients' steps scaled by ``lr_scale`` from then on."""

    def __init__(self, warmup: int = 5, lr_scale: float = 1.0, **kwargs) -> None:
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0 rounds, got {warmup}")
        if not 0.0 < lr_scale <= 1.0:
            raise ValueError(f"lr_scale must be in (0, 1] (the frozen phase's step as a "
                             f"fraction of client.lr), got {lr_scale}")
        super().__init__(**kwargs)
        self.warmup = warmup
        self.lr_scale = float(lr_scale)

    def frozen(self, server_round: int) -> bool:
        """Whether BN statistics are frozen in ``server_round``."""
        return server_round > self.warmup

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays
        if self.frozen(server_round):
            request_hooks(config, "fixbn")
            if self.lr_scale != 1.0:
                config[LR_SCALE_KEY] = self.lr_scale
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.frozen(server_round):
            arrays = keep_absent(arrays, self.current_arrays)
        return arrays, metrics
