"""Model state ↔ Flower ArrayRecord, with integer buffers kept integer.

Flower's aggregation averages every array, so BatchNorm's 0-d int64 ``num_batches_tracked``
comes back as a float. We send every entry of the state dict (weights and BN buffers,
explicitly) and, on loading, round integer buffers back to their integer dtype.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from torch import nn

from fedsim import compat
from fedsim.compat import TypedDict  # noqa: F401  (re-exported for tests/test_arrays.py)
from fedsim.records import check_replies

_NUMPY_STYPE = "numpy.ndarray"  # flwr's SType.NUMPY: data holds an ``np.save`` file
_flower_numpy = compat.flower_numpy  # Flower's own parser (np.load), for any other layout


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


@functools.lru_cache(maxsize=4096)
def _encode_layout(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[str, bytes]:
    """(dtype name as Flower writes it, ``.npy`` header) for one array layout."""
    return str(dtype), _npy_header(dtype, shape)


@functools.lru_cache(maxsize=4096)
def _decode_layout(dtype_name: str, shape: tuple[int, ...]) -> tuple[np.dtype, bytes, int] | None:
    """(dtype, header, total bytes) of the standard ``.npy`` file for a layout, or None."""
    try:
        dtype = np.dtype(dtype_name)
    except TypeError:
        return None
    if dtype.hasobject:
        return None
    header = _npy_header(dtype, shape)
    return dtype, header, len(header) + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def new_array(dtype_name: str, shape: tuple[int, ...], data: bytes,
               stype: str = _NUMPY_STYPE) -> Array:
    """``Array(dtype=..., shape=..., stype=..., data=...)`` without its argument dispatch:
    the same four fields and the same fresh-object dirty flag (checked against Flower's
    constructor in tests/test_arrays.py)."""
    return compat.new_array(dtype_name, shape, data, stype)


def to_array(a: np.ndarray) -> Array:
    """``Array(a)`` with the same bytes as Flower's ``np.save`` path, at a fraction of its cost.

    The ``.npy`` header depends only on dtype and shape, so it is built once per layout and
    the data is appended raw (``np.save`` re-formats the header for every array).
    """
    a = np.asarray(a, order="C")  # (np.ascontiguousarray would turn 0-d into shape (1,))
    if a.dtype.hasobject:
        raise TypeError("object arrays cannot be sent")
    name, header = _encode_layout(a.dtype, a.shape)
    return new_array(name, a.shape, header + a.tobytes())


def _decode(arr: Array, copy: bool = True) -> np.ndarray | None:
    """The array in ``arr`` if its data is a standard ``.npy`` file, else None (``copy=False``:
    a read-only view of its bytes)."""
    payload = _payload(arr)
    if payload is None:
        return None
    dtype, shape, raw = payload
    out = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return out.copy() if copy else out


def from_array(arr: Array) -> np.ndarray:
    """``arr.numpy()`` without re-parsing the ``.npy`` header when it is the standard one."""
    out = _decode(arr)
    return out if out is not None else _flower_numpy(arr)


def peek_array(arr: Array) -> np.ndarray:
    """The values of ``arr`` to read, not keep: a read-only view of its bytes when they are
    a standard ``.npy`` file (no copy), else Flower's parse."""
    out = _decode(arr, copy=False)
    return out if out is not None else _flower_numpy(arr)


def _payload(arr: Array) -> tuple[np.dtype, tuple[int, ...], memoryview] | None:
    """(dtype, shape, raw element bytes) of ``arr`` when its data is a standard ``.npy`` file
    (a view: no copy), else None."""
    if arr.stype != _NUMPY_STYPE:
        return None
    shape = tuple(arr.shape)
    layout = _decode_layout(arr.dtype, shape)
    if layout is None:
        return None
    dtype, header, size = layout
    data = arr.data
    if len(data) != size or not data.startswith(header):
        return None
    return dtype, shape, memoryview(data)[len(header):]


def all_finite(arrays: Iterable[Array]) -> bool:
    """Whether no floating or complex array of ``arrays`` holds a NaN or an Inf.

    One ``isfinite`` per dtype over the arrays' bytes joined, instead of a parse and two
    numpy calls per array (a round screens every array of every reply)."""
    parts: dict[np.dtype, list[memoryview]] = {}
    for arr in arrays:
        payload = _payload(arr)
        if payload is None:  # another layout: Flower's parse, checked on its own
            x = _flower_numpy(arr)
            if x.dtype.kind in "fc" and not np.isfinite(x).all():
                return False
        elif payload[0].kind in "fc":
            parts.setdefault(payload[0], []).append(payload[2])
    return all(np.isfinite(np.frombuffer(b"".join(views), dtype=dtype)).all()
               for dtype, views in parts.items())


#: NumPy 2 types ``array * python_float`` by the array alone, 0-d arrays included (NEP 50);
#: NumPy 1 made a 0-d float32 times a float a float64, unlike a longer array
_WEAK_FLOAT_SCALARS = int(np.__version__.split(".")[0]) >= 2


def _flat_exact(dtype: np.dtype) -> bool:
    """Whether ``array * float`` and ``+=`` on ``dtype`` round each element on its own, so
    one call over many arrays gives every element the bits of one call per array: IEEE
    float32/float64, and integers and bools (which become float64), under NumPy 2's
    promotion rules."""
    return _WEAK_FLOAT_SCALARS and (
        dtype.kind in "iub" or (dtype.kind == "f" and dtype.itemsize in (4, 8)))


def _weight_factors(records: list[RecordDict], weighting_metric_name: str) -> list[float]:
    """Each reply's weight over their sum, computed as Flower's ``aggregate_arrayrecords``
    does: ``weighting_metric_name`` of the reply's first MetricRecord (read without building
    ``metric_records``' view)."""
    weights = [next(r for r in record.values() if isinstance(r, MetricRecord))
               [weighting_metric_name] for record in records]
    total_weight = sum(weights)
    return [w / total_weight for w in weights]


def _only_arrays(record: RecordDict) -> ArrayRecord | None:
    """The reply's ArrayRecord if it holds exactly one, else None."""
    found = None
    for r in record.values():
        if isinstance(r, ArrayRecord):
            if found is not None:
                return None
            found = r
    return found


def weighted_average(records: list[RecordDict], weighting_metric_name: str
                     ) -> ArrayRecord | None:
    """Flower's ``aggregate_arrayrecords`` with one multiply and one add per dtype per reply.

    Flower computes, per array and in reply order, ``acc = v0 * w0`` then ``acc += vi * wi``
    (NumPy 2 keeps float32 arrays float32 under a Python-float weight; integers become
    float64): a parse and two numpy calls per array per reply. Here each reply's arrays of
    one dtype are joined into one flat buffer and go through the same operations, which
    round each element on its own, so the result is bitwise Flower's
    (tests/test_arrays.py). The first reply's ``.npy`` headers give the layout; a later
    array qualifies when its bytes start with the same header and have the same length
    (the header is what Flower's parser reads dtype and shape from). None where that does
    not hold (differing keys, dtypes or shapes, several ArrayRecords in a reply, dtypes
    whose arithmetic is not per element, other layouts): the caller runs Flower's own.
    """
    if not records:
        return None
    factors = _weight_factors(records, weighting_metric_name)
    first = _only_arrays(records[0])
    if first is None:
        return None
    keys = list(first)
    layout = []  # per key: (dtype, shape, header length, total bytes, header)
    for arr in first.values():
        payload = _payload(arr)
        if payload is None or not _flat_exact(payload[0]):
            return None
        dtype, shape, view = payload
        hlen = len(arr.data) - len(view)
        layout.append((dtype, shape, hlen, len(arr.data), arr.data[:hlen]))
    acc: dict[np.dtype, np.ndarray] = {}
    for n, (record, weight) in enumerate(zip(records, factors, strict=True)):
        rec = first if n == 0 else _only_arrays(record)
        if rec is None or list(rec) != keys:
            return None
        parts: dict[np.dtype, list[memoryview]] = {dtype: [] for dtype, *_ in layout}
        for (dtype, _, hlen, size, header), arr in zip(layout, rec.values()):
            data = arr.data
            if arr.stype != _NUMPY_STYPE or len(data) != size or not data.startswith(header):
                return None
            parts[dtype].append(memoryview(data)[hlen:])
        for dtype, views in parts.items():
            product = np.frombuffer(b"".join(views), dtype=dtype) * weight
            if n == 0:
                acc[dtype] = product
            else:
                acc[dtype] += product
    out: dict[str, Array] = {}
    offsets = dict.fromkeys(acc, 0)
    for key, (dtype, shape, *_) in zip(keys, layout):
        start = offsets[dtype]
        size = int(np.prod(shape, dtype=np.int64))
        offsets[dtype] = start + size
        out[key] = to_array(acc[dtype][start : start + size].reshape(shape))
    return array_record(out)


def aggregate_arrayrecords(records: list[RecordDict], weighting_metric_name: str
                           ) -> ArrayRecord:
    """Flower's ``aggregate_arrayrecords``, bitwise, through :func:`weighted_average` where
    it applies and Flower's own function elsewhere."""
    fast = weighted_average(records, weighting_metric_name)
    return fast if fast is not None else compat.flower_aggregate_arrayrecords(
        records, weighting_metric_name)


def _fast_numpy(self: Array) -> np.ndarray:
    return from_array(self)


_fast_numpy.__doc__ = Array.numpy.__doc__


def fast_flower_records():
    """Four of Flower's per-item costs, removed while the engine runs; restored on exit.

    - ``Array.numpy`` parses every ``.npy`` header with ``ast.literal_eval``, costlier than a
      small model's whole aggregation step; :func:`from_array` returns the identical array
      and hands any other layout to Flower's parser.
    - ``TypedDict.__setitem__`` (every record and ``RecordDict`` item, and every view such
      as ``content.array_records``) builds two ``typing`` aliases per call for a no-op
      ``cast``; the replacement runs the same key and value checks and stores the same item.
    - FedAvg's ``aggregate_arrayrecords`` makes a parse and two numpy calls per array per
      reply; :func:`aggregate_arrayrecords` makes two per dtype per reply, bitwise equal.
      Its ``validate_message_reply_consistency`` builds four typed views per reply;
      :func:`fedsim.records.check_replies` makes the same checks without them.

    Installed through :func:`fedsim.compat.fast_records` (only on the Flower releases it
    was checked against); re-entrant; Flower's results are unchanged (tests/test_arrays.py).
    """
    return compat.fast_records(_fast_numpy, aggregate_arrayrecords, check_replies)


def array_record(arrays: dict[str, Array]) -> ArrayRecord:
    """``ArrayRecord`` holding ``arrays`` (not copies), as setting them one by one would
    (same items, same dirty flag; tests/test_arrays.py), at a fraction of Flower's per-item
    cost. ``ArrayRecord(arrays)`` would copy every Array."""
    for k, v in arrays.items():
        if not isinstance(k, str) or not isinstance(v, Array):
            raise TypeError(f"an ArrayRecord maps str to Array, got {type(k).__name__} -> "
                            f"{type(v).__name__}")
    return compat.fill_record(ArrayRecord(), arrays)


def state_to_record(
    state: dict[str, torch.Tensor | np.ndarray], keys: Iterable[str] | None = None
) -> ArrayRecord:
    """Pack ``state`` (or only ``keys`` of it) into an ArrayRecord of numpy arrays; values
    are tensors (any device) or numpy arrays."""
    names = state if keys is None else keys
    arrays = {}
    for k in names:  # to_array and array_record in one loop: a reply encodes every array
        if not isinstance(k, str):
            raise TypeError(f"an ArrayRecord maps str to Array, got {type(k).__name__} -> Array")
        a = np.asarray(_host_numpy(state[k]), order="C")
        if a.dtype.hasobject:
            raise TypeError("object arrays cannot be sent")
        name, header = _encode_layout(a.dtype, a.shape)
        arrays[k] = compat.new_array(name, a.shape, header + a.tobytes(), _NUMPY_STYPE)
    return compat.fill_record(ArrayRecord(), arrays)


def _host_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    """``value`` as a numpy array on the host: ``value.detach().cpu().numpy()`` for a tensor,
    skipping the calls that would change nothing (a reply's arrays are CPU tensors without
    gradient, one per array and client)."""
    if isinstance(value, np.ndarray):
        return value
    if value.requires_grad:
        value = value.detach()
    if not value.is_cpu:
        value = value.cpu()
    return value.numpy()


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


def load_record(model: nn.Module, record: ArrayRecord | dict[str, torch.Tensor],
                targets: Mapping[str, torch.Tensor] | None = None) -> None:
    """Copy arrays into ``model`` in place; entries absent from ``record`` stay as they are.

    Integer buffers (``num_batches_tracked``) are rounded back to integers, since Flower's
    weighted averaging turns them into floats. Unknown names raise KeyError. ``targets``:
    the model's ``state_dict(keep_vars=True)`` if the caller already holds it.
    """
    if targets is None:
        targets = model.state_dict(keep_vars=True)
    if isinstance(record, ArrayRecord):
        record = _decoded.tensors(record)
    with torch.no_grad():
        for key, value in record.items():
            dst = targets.get(key)
            if dst is None:
                raise KeyError(f"array {key!r} does not belong to this model")
            src = value if isinstance(value, torch.Tensor) else torch.from_numpy(from_array(value))
            if not dst.dtype.is_floating_point:
                src = torch.round(src.double())
            if src.shape != dst.shape:
                src = src.reshape(dst.shape)
            dst.data.copy_(src)  # copy_ converts the dtype
