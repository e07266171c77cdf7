"""Shared server-side pieces of strategies whose clients keep some arrays local."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.client.hooks import request_hooks


def keep_absent(aggregated: ArrayRecord, current: ArrayRecord) -> ArrayRecord:
    """The aggregate completed with every key of ``current``, in ``current``'s order.

    Keys no client uploaded (its local layers) keep the current global value — the very
    same bytes — so aggregation never touches them. A key the aggregate has but the global
    arrays do not is an error, not something to drop.
    """
    unknown = [k for k in aggregated if k not in current]
    if unknown:
        raise ValueError(f"clients uploaded arrays the global model does not have: {unknown}")
    return ArrayRecord({k: aggregated[k] if k in aggregated else current[k]
                        for k in current})


class LocalArraysFedAvg(FedAvg):
    """FedAvg whose clients keep some arrays local (a client hook strips them from uploads).

    ``client_hooks`` are requested in every train config, ``personal_hooks`` in every
    evaluate config (they rebuild each client's own model for personalized evaluation);
    ``aggregate_train`` keeps the global value of every array no client uploaded.
    """

    client_hooks: ClassVar[tuple[str, ...]] = ()
    personal_hooks: ClassVar[tuple[str, ...]] = ()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays
        request_hooks(config, *self.client_hooks)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = keep_absent(arrays, self.current_arrays)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        request_hooks(config, *self.personal_hooks)
        return super().configure_evaluate(server_round, arrays, config, grid)
