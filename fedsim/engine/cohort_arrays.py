"""A cohort's start arrays: the received global arrays, decoded once and shared, and each
client's hooks laid over them (``on_receive``) as the one-at-a-time backend would.

Shared by the cohort trainer (:mod:`fedsim.engine.vectorized`) and evaluator
(:mod:`fedsim.engine.vectorized_eval`), so neither imports the other's module for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.arrays import load_record
from fedsim.client.hooks import ClientHook, apply_received
from fedsim.client.step import ClientArrays


class GlobalArrays:
    """The received global arrays as detached (parameters, buffers) copies, made once per
    ``ArrayRecord`` (a cohort's messages share one) and shared by every client that starts
    from them unchanged."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._held: tuple | None = None  # (record, params, buffers)

    def __call__(self, record: ArrayRecord) -> tuple[dict[str, torch.Tensor],
                                                    dict[str, torch.Tensor]]:
        if self._held is None or self._held[0] is not record:
            load_record(self.model, record)
            self._held = (record,
                          {n: p.detach().clone() for n, p in self.model.named_parameters()},
                          {n: b.detach().clone() for n, b in self.model.named_buffers()})
        return self._held[1], self._held[2]


def client_start(model: nn.Module, params: dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor], hooks: Sequence[ClientHook],
                 local_train: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
                 ) -> ClientArrays:
    """The hooks' ``on_receive`` on a client that starts from the shared ``params`` and
    ``buffers`` (not copied: overrides stay in the returned arrays' ``overrides``); a cold
    start they ask for is served eagerly (:func:`serve_eagerly`)."""
    arrays = ClientArrays({**params, **buffers})
    for hook in hooks:
        hook.on_receive(model, arrays)
    if arrays.estimates:
        serve_eagerly(model, params, buffers, arrays, local_train)
    return arrays


def serve_eagerly(model: nn.Module, params: dict[str, torch.Tensor],
                  buffers: dict[str, torch.Tensor], arrays: ClientArrays,
                  local_train: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None) -> None:
    """Apply ``arrays`` (overrides, then statistics re-estimations) on ``model`` as the
    sequential backend does, and keep the result as the client's overrides."""
    load_record(model, {**params, **buffers})
    apply_received(model, arrays, local_train)
    arrays.overrides = {n: t.detach().clone() for n, t in model.state_dict().items()}
    arrays.estimates = []
