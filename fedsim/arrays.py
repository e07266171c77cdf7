"""Model state ↔ Flower ArrayRecord, with integer buffers kept integer.

Flower's aggregation averages every array, so BatchNorm's 0-d int64 ``num_batches_tracked``
comes back as a float. We send every entry of the state dict (weights and BN buffers,
explicitly) and, on loading, round integer buffers back to their integer dtype.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn


def state_to_record(
    state: dict[str, torch.Tensor], keys: Iterable[str] | None = None
) -> ArrayRecord:
    """Pack ``state`` (or only ``keys`` of it) into an ArrayRecord of numpy arrays."""
    names = list(state) if keys is None else list(keys)
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(state[k].detach().cpu().numpy())) for k in names}
    )


def model_to_record(model: nn.Module, keys: Iterable[str] | None = None) -> ArrayRecord:
    """The arrays a client uploads: the model's state dict (parameters and buffers)."""
    return state_to_record(model.state_dict(), keys)


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Unpack an ArrayRecord into CPU tensors (dtype as stored)."""
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def load_record(model: nn.Module, record: ArrayRecord | dict[str, torch.Tensor]) -> None:
    """Copy arrays into ``model`` in place; entries absent from ``record`` stay as they are.

    Integer buffers (``num_batches_tracked``) are rounded back to integers, since Flower's
    weighted averaging turns them into floats. Unknown names raise KeyError.
    """
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in record.items():
            if key not in targets:
                raise KeyError(f"array {key!r} does not belong to this model")
            src = value if isinstance(value, torch.Tensor) else torch.from_numpy(value.numpy())
            dst = targets[key]
            if not dst.dtype.is_floating_point:
                src = torch.round(src.double())
            dst.data.copy_(src.reshape(dst.shape).to(dtype=dst.dtype))
