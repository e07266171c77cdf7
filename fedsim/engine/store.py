"""Per-client state (Flower ``Context.state``) under a memory budget, spilling to disk.

A stateful strategy (FedBN's local layers, SCAFFOLD's control variates) leaves a
``RecordDict`` on every client it ever sampled; with 10,000 clients these add up. The store
keeps each client's state as Flower's own protobuf bytes: the most recently used ones in
memory up to ``memory_budget`` bytes, the rest in one spill file under a private folder.
Every operation touches one client, so a round costs the same whether 10 or 10,000 clients
already hold state. Round trips are exact: what was put is what comes back.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import struct
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from flwr.app import ArrayRecord, RecordDict

from fedsim.arrays import array_record, new_array
from fedsim.compat import ProtoRecordDict, recorddict_from_proto, recorddict_to_proto
from fedsim.files import make_folder, writing

#: first bytes of the arrays-only encoding; a protobuf RecordDict never starts with a 0 byte
#: (field number 0 is invalid), so the two encodings cannot be confused
_ARRAYS_MAGIC = b"\x00fsA2"
_U32 = struct.Struct("<I")
_SEP, _LINE = "\x1f", "\n"  # field and line separators of the text header


def _plain(name: str) -> bool:
    return _SEP not in name and _LINE not in name


@functools.lru_cache(maxsize=4096)
def _array_line(key: str, dtype: str, stype: str, shape: tuple[int, ...], nbytes: int) -> str:
    """The header line of one array: the same few layouts recur for every client, so each
    line is formatted once."""
    dims = ",".join(map(str, shape))
    return f"A{_SEP}{key}{_SEP}{dtype}{_SEP}{stype}{_SEP}{dims}{_SEP}{nbytes}"


def encode_state(state: RecordDict) -> bytes:
    """A RecordDict as bytes that :func:`decode_state` turns back into an equal one, exactly.

    States made only of ArrayRecords (FedBN's local layers, SCAFFOLD's control variates:
    the common case) use a flat layout — a text header naming every record and array, then
    the arrays' bytes — a few times cheaper to write than Flower's protobuf; anything else
    is Flower's protobuf bytes.
    """
    if not state or not all(isinstance(r, ArrayRecord) and _plain(k) and all(map(_plain, r))
                            for k, r in state.items()):
        return recorddict_to_proto(state).SerializeToString()
    lines, blobs = [], []
    for rkey, record in state.items():
        lines.append(f"R{_SEP}{rkey}")
        for key, a in record.items():
            lines.append(_array_line(key, a.dtype, a.stype, tuple(a.shape), len(a.data)))
            blobs.append(a.data)
    header = _LINE.join(lines).encode()
    return b"".join([_ARRAYS_MAGIC, _U32.pack(len(header)), header, *blobs])


def _decode_arrays(data: bytes) -> RecordDict:
    start = len(_ARRAYS_MAGIC) + 4
    (size,) = _U32.unpack_from(data, len(_ARRAYS_MAGIC))
    pos = start + size
    out = RecordDict()
    records: list[tuple[str, dict]] = []
    for line in data[start:pos].decode().split(_LINE):
        fields = line.split(_SEP)
        if fields[0] == "R":
            records.append((fields[1], {}))
            continue
        _, key, dtype, stype, shape, nbytes = fields
        end = pos + int(nbytes)
        records[-1][1][key] = new_array(
            dtype, tuple(int(d) for d in shape.split(",")) if shape else (), data[pos:end],
            stype)
        pos = end
    if pos != len(data):
        raise ValueError(f"client state: {len(data) - pos} bytes left over after decoding")
    for rkey, arrays in records:
        out[rkey] = array_record(arrays)
    return out


def decode_state(data: bytes) -> RecordDict:
    """The RecordDict ``encode_state`` wrote.

    For protobuf bytes: Flower's ``recorddict_from_proto``, except that arrays are built
    directly (Flower's path constructs every Array twice through its argument dispatch,
    which dominates the cost of reading a small state back).
    """
    if data.startswith(_ARRAYS_MAGIC):
        return _decode_arrays(data)
    proto = ProtoRecordDict.FromString(data)
    if not any(item.WhichOneof("value") == "array_record" for item in proto.items):
        return recorddict_from_proto(proto)
    out = RecordDict()
    for item in proto.items:
        if item.WhichOneof("value") == "array_record":
            out[item.key] = array_record({
                e.key: new_array(e.value.dtype, tuple(e.value.shape), e.value.data,
                                 e.value.stype) for e in item.array_record.items})
        else:  # metric and config records: Flower's own decoding
            out[item.key] = recorddict_from_proto(ProtoRecordDict(items=[item]))[item.key]
    return out


def _locked(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class ClientStateStore:
    """Client id → state, at most ``memory_budget`` bytes of it in memory, the rest on disk.

    The disk tier is one file, opened once, with a slot per client: a state spilled again
    reuses its client's slot when it fits and takes a new slot at the end otherwise, so a
    spill or a load is one ``pwrite`` or ``pread`` whatever the number of clients, and the
    file never holds more than one slot per client.

    Parameters
    ----------
    memory_budget:
        Bytes of encoded state kept in memory; least recently used states beyond it are
        written to disk. ``0`` keeps nothing in memory.
    spill_dir:
        Folder in which the store makes its own private subfolder (removed by ``close``);
        ``None`` uses the system's temporary folder. Created on the first spill.
    """

    def __init__(self, memory_budget: int, spill_dir: str | Path | None = None) -> None:
        if memory_budget < 0:
            raise ValueError(f"memory_budget must be >= 0, got {memory_budget}")
        self.memory_budget = int(memory_budget)
        self._spill_parent = None if spill_dir is None else Path(spill_dir)
        self._dir: Path | None = None
        self._fd: int | None = None
        self._end = 0  # file size: new slots start here
        self._memory: OrderedDict[int, bytes] = OrderedDict()  # LRU order, oldest first
        self._disk: dict[int, int] = {}  # key -> bytes of its state on disk (valid entries)
        self._slots: dict[int, tuple[int, int]] = {}  # key -> (offset, capacity) in the file
        self.memory_bytes = 0
        self.disk_bytes = 0
        self.spills = 0  # states written to disk
        self.loads = 0  # states read back from disk
        self._changed: set[int] = set()  # keys put or deleted since take_changes()
        self._lock = threading.RLock()  # in-process workers may call from several threads

    # -- mapping interface -----------------------------------------------------------------
    @_locked
    def get(self, key: int) -> RecordDict:
        """A fresh copy of ``key``'s state (an empty RecordDict if it has none)."""
        data = self.raw(key)
        return RecordDict() if data is None else decode_state(data)

    @_locked
    def raw(self, key: int) -> bytes | None:
        """``key``'s state as stored (:func:`encode_state` bytes), or None."""
        data = self._memory.get(key)
        if data is not None:
            self._memory.move_to_end(key)
        elif key in self._disk:
            offset, _ = self._slots[key]
            data = os.pread(self._fd, self._disk[key], offset)
            self.loads += 1
        return data

    @_locked
    def put(self, key: int, state: RecordDict) -> None:
        """Store ``state`` for ``key`` (an empty one deletes it), then enforce the budget."""
        self.delete(key)
        self._changed.add(key)
        if len(state) == 0:
            return
        data = encode_state(state)
        self._memory[key] = data
        self.memory_bytes += len(data)
        self._enforce_budget()

    @_locked
    def put_raw(self, key: int, data: bytes) -> None:
        """Store state bytes made by :func:`encode_state` for ``key`` (``b""``: no state, the
        key is deleted), as :meth:`put` would store the state they encode."""
        self.delete(key)
        self._changed.add(key)
        if not data:
            return
        self._memory[key] = data
        self.memory_bytes += len(data)
        self._enforce_budget()

    @_locked
    def delete(self, key: int) -> None:
        """Forget ``key``'s state wherever it is (its disk slot stays reserved for it)."""
        self._changed.add(key)
        data = self._memory.pop(key, None)
        if data is not None:
            self.memory_bytes -= len(data)
        size = self._disk.pop(key, None)
        if size is not None:
            self.disk_bytes -= size

    @_locked
    def __contains__(self, key: object) -> bool:
        return key in self._memory or key in self._disk

    @_locked
    def __len__(self) -> int:
        return len(self._memory) + len(self._disk)

    @_locked
    def keys(self) -> list[int]:
        """Every client id holding state, in ascending order."""
        return sorted([*self._memory, *self._disk])

    def items(self) -> Iterator[tuple[int, RecordDict]]:
        """``(key, state)`` for every key, one state decoded at a time (for checkpoints)."""
        for key in self.keys():
            yield key, self.get(key)

    @_locked
    def take_changes(self) -> list[tuple[int, bytes | None]]:
        """``(key, bytes or None if deleted)`` for every key changed since the last call, in
        key order; what a checkpoint appends to its journal (:mod:`fedsim.state_journal`)."""
        keys, self._changed = sorted(self._changed), set()
        return [(k, self.raw(k)) for k in keys]

    @property
    def file_bytes(self) -> int:
        """Size of the spill file (valid states plus the reserved slots of reloaded ones)."""
        return self._end

    # -- lifecycle -------------------------------------------------------------------------
    @_locked
    def close(self) -> None:
        """Drop every state and remove the spill folder."""
        self._memory.clear()
        self._disk.clear()
        self._slots.clear()
        self.memory_bytes = self.disk_bytes = self._end = 0
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> ClientStateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    # -- internals -------------------------------------------------------------------------
    def _enforce_budget(self) -> None:
        while self.memory_bytes > self.memory_budget and self._memory:
            key, data = self._memory.popitem(last=False)
            self.memory_bytes -= len(data)
            self._write(key, data)
            self._disk[key] = len(data)
            self.disk_bytes += len(data)
            self.spills += 1

    def _write(self, key: int, data: bytes) -> None:
        if self._fd is None:  # a full or read-only disk ends the run in one line (fedsim.cli)
            parent = self._spill_parent
            with writing(parent or tempfile.gettempdir()):
                if parent is not None:
                    make_folder(parent)
                self._dir = Path(tempfile.mkdtemp(
                    prefix="fedsim-state-", dir=None if parent is None else os.fspath(parent)))
            with writing(self._dir / "states.bin"):
                self._fd = os.open(self._dir / "states.bin", os.O_RDWR | os.O_CREAT, 0o600)
        slot = self._slots.get(key)
        if slot is None or slot[1] < len(data):
            slot = (self._end, len(data) + len(data) // 8)  # room to grow a little
            self._end += slot[1]
            self._slots[key] = slot
        with writing(self._dir / "states.bin"):
            written = os.pwrite(self._fd, data, slot[0])
            if written != len(data):  # the disk filled up
                raise OSError(errno.ENOSPC, f"short write to the client-state file "
                                            f"({written} of {len(data)} bytes)")
