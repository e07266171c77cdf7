"""Model state ↔ Flower ArrayRecord, with integer buffers kept integer.

Flower's aggregation averages every array, so BatchNorm's 0-d int64 ``num_batches_tracked``
comes back as a float. We send every entry of the state dict (weights and BN buffers,
explicitly) and, on loading, round integer buffers back to their integer dtype.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

_NUMPY_STYPE = "numpy.ndarray"  # flwr's SType.NUMPY: data holds an ``np.save`` file


@functools.lru_cache(maxsize=4096)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def to_array(a: np.ndarray) -> Array:
    """``Array(a)`` with the same bytes as Flower's ``np.save`` path, at a fraction of its cost.

    The ``.npy`` header depends only on dtype and shape, so it is built once per layout and
    the data is appended raw (``np.save`` re-formats the header for every array).
    """
    a = np.ascontiguousarray(a)
    if a.dtype.hasobject:
        raise TypeError("object arrays cannot be sent")
    data = _npy_header(a.dtype, a.shape) + a.tobytes()
    return Array(dtype=str(a.dtype), shape=tuple(a.shape), stype=_NUMPY_STYPE, data=data)


def from_array(arr: Array) -> np.ndarray:
    """``arr.numpy()`` without re-parsing the ``.npy`` header when it is the standard one."""
    if arr.stype == _NUMPY_STYPE:
        try:
            dtype = np.dtype(arr.dtype)
        except TypeError:
            dtype = None
        if dtype is not None and not dtype.hasobject:
            header = _npy_header(dtype, tuple(arr.shape))
            count = int(np.prod(arr.shape, dtype=np.int64))
            size = len(header) + count * dtype.itemsize
            if len(arr.data) == size and arr.data.startswith(header):
                flat = np.frombuffer(arr.data, dtype=dtype, count=count, offset=len(header))
                return flat.reshape(arr.shape).copy()
    return arr.numpy()  # any other layout: Flower's own parser


def state_to_record(
    state: dict[str, torch.Tensor], keys: Iterable[str] | None = None
) -> ArrayRecord:
    """Pack ``state`` (or only ``keys`` of it) into an ArrayRecord of numpy arrays."""
    names = list(state) if keys is None else list(keys)
    return ArrayRecord({k: to_array(state[k].detach().cpu().numpy()) for k in names})


def model_to_record(model: nn.Module, keys: Iterable[str] | None = None) -> ArrayRecord:
    """The arrays a client uploads: the model's state dict (parameters and buffers)."""
    return state_to_record(model.state_dict(), keys)


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Unpack an ArrayRecord into CPU tensors (dtype as stored)."""
    return {k: torch.from_numpy(from_array(v)) for k, v in record.items()}


class _DecodeCache:
    """The tensors of the last ArrayRecord loaded, reused while its arrays are unchanged.

    A strategy sends one ArrayRecord to every client of a round; in one process it is
    decoded once per round instead of once per client.
    """

    def __init__(self) -> None:
        self._entry: tuple = (None, None, {})  # (record, array identities, tensors): one slot

    def tensors(self, record: ArrayRecord) -> dict[str, torch.Tensor]:
        key = [(k, id(v), id(v.data)) for k, v in record.items()]
        cached, cached_key, tensors = self._entry
        if record is not cached or key != cached_key:
            tensors = {k: torch.from_numpy(from_array(v)) for k, v in record.items()}
            self._entry = (record, key, tensors)  # the record is held, so its ids stay unique
        return tensors


_decoded = _DecodeCache()


def load_record(model: nn.Module, record: ArrayRecord | dict[str, torch.Tensor]) -> None:
    """Copy arrays into ``model`` in place; entries absent from ``record`` stay as they are.

    Integer buffers (``num_batches_tracked``) are rounded back to integers, since Flower's
    weighted averaging turns them into floats. Unknown names raise KeyError.
    """
    targets = model.state_dict(keep_vars=True)
    if isinstance(record, ArrayRecord):
        record = _decoded.tensors(record)
    with torch.no_grad():
        for key, value in record.items():
            if key not in targets:
                raise KeyError(f"array {key!r} does not belong to this model")
            src = value if isinstance(value, torch.Tensor) else torch.from_numpy(from_array(value))
            dst = targets[key]
            if not dst.dtype.is_floating_point:
                src = torch.round(src.double())
            dst.data.copy_(src.reshape(dst.shape).to(dtype=dst.dtype))
