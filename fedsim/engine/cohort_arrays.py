"""A cohort's start state: the received global arrays, with each client's saved arrays
(FedBN's local layers, SiloBN's statistics) laid over them as ``load_record`` would load them.

Shared by the cohort trainer (:mod:`fedsim.engine.vectorized`) and evaluator
(:mod:`fedsim.engine.vectorized_eval`), so neither imports the other's module for them.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsim.arrays import load_record, peek_array


def overlay(start: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
            saved: ArrayRecord) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``start``/``buffers`` with ``saved`` arrays in place of theirs, converted as
    :func:`fedsim.arrays.load_record` converts them (dtype, shape, integers rounded)."""
    start, buffers = dict(start), dict(buffers)
    for key, value in saved_arrays(saved, start, buffers).items():
        target = start if key in start else buffers
        target[key] = overlay_one(value, target[key])
    return start, buffers


def saved_arrays(saved: ArrayRecord, start: dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """``saved``'s arrays by name, as read-only numpy views of their bytes; a name that is
    not one of the model's parameters or buffers raises ``KeyError``."""
    out = {}
    for key, value in saved.items():
        if key not in start and key not in buffers:
            raise KeyError(f"array {key!r} does not belong to this model")
        out[key] = peek_array(value)
    return out


def overlay_one(value: np.ndarray, ref: torch.Tensor) -> torch.Tensor:
    """``value`` as a tensor of ``ref``'s dtype, shape and device (integers rounded)."""
    t = torch.from_numpy(np.array(value))  # a writable copy of the (read-only) view
    if not ref.dtype.is_floating_point:
        t = torch.round(t.double())
    if t.shape != ref.shape:
        t = t.reshape(ref.shape)
    if t.dtype != ref.dtype or t.device != ref.device:  # (.to's argument parsing is
        t = t.to(device=ref.device, dtype=ref.dtype)  # the costly part: skip a no-op)
    return t


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
