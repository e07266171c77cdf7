"""An append-only journal of client states beside a run's checkpoints.

Writing every client's state into every checkpoint would cost a round more the more clients
hold state (10,000 FedBN clients: every round re-writes all of them). Instead each checkpoint
appends only the states that changed since the previous one to ``client_states.<gen>.log``
and records how many bytes of the journal it covers; replaying that prefix (the last entry
of a client wins) gives every client's state at that checkpoint. Earlier prefixes stay valid
as the file grows, so ``checkpoint.prev.pt`` still reads. When dead entries dominate, the
checkpointer starts the next generation with the live states only.

File layout: ``MAGIC``, then entries of ``<key int64, length int32 (-1: deleted), crc32
uint32>`` followed by ``length`` bytes (the state as Flower's protobuf bytes).
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

from fedsim.errors import CheckpointError
from fedsim.files import fsync_dir, writing

MAGIC = b"FSJ1"
_ENTRY = struct.Struct("<qiI")
_NAME = re.compile(r"client_states\.(\d+)\.log")


def journal_name(generation: int) -> str:
    return f"client_states.{generation}.log"


def journal_generation(name: str) -> int:
    m = _NAME.fullmatch(name)
    if m is None:
        raise CheckpointError(f"{name!r} is not a client-state journal name")
    return int(m.group(1))


class StateJournal:
    """One journal file open for appending; ``size`` is the byte count written and synced."""

    def __init__(self, folder: str | Path, generation: int, valid_bytes: int | None = None
                 ) -> None:
        """Start generation ``generation`` afresh, or (``valid_bytes``) reopen it for a resumed
        run, dropping anything past the bytes its checkpoint covers (a crashed round's tail)."""
        self.folder = Path(folder)
        self.generation = generation
        self.path = self.folder / journal_name(generation)
        if valid_bytes is None:
            with writing(self.path):
                self._fh = open(self.path, "wb")  # noqa: SIM115 (held open across appends)
                self._fh.write(MAGIC)
                self._sync()
            fsync_dir(self.folder)
        else:
            if not self.path.exists() or self.path.stat().st_size < valid_bytes:
                raise CheckpointError(f"{self.path}: missing or shorter than the {valid_bytes} "
                                      "bytes its checkpoint covers")
            with writing(self.path):
                self._fh = open(self.path, "r+b")  # noqa: SIM115 (held open across appends)
                self._fh.truncate(valid_bytes)
                self._fh.seek(valid_bytes)
                self._sync()
        self.size = self._fh.tell()

    @property
    def name(self) -> str:
        return self.path.name

    def append(self, changes: Iterable[tuple[int, bytes | None]]) -> int:
        """Append ``(client, state bytes or None for deleted)`` entries; returns the synced size.

        A failure to write (a full disk) can leave part of an entry: the checkpoints record
        the bytes they cover, and a resumed run cuts the journal back to them."""
        with writing(self.path):
            for key, data in changes:
                if data is None:
                    self._fh.write(_ENTRY.pack(int(key), -1, 0))
                else:
                    self._fh.write(_ENTRY.pack(int(key), len(data), zlib.crc32(data)))
                    self._fh.write(data)
            self._sync()
        self.size = self._fh.tell()
        return self.size

    def close(self) -> None:
        """Close the file; bytes past the last synced append (a failed one's) may be lost,
        and no checkpoint covers them."""
        if not self._fh.closed:
            with contextlib.suppress(OSError):
                self._fh.close()

    def _sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())


def read_journal(path: str | Path, length: int) -> dict[int, bytes]:
    """Client → state bytes after replaying the first ``length`` bytes of journal ``path``."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(length)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint keeps its client states "
                              "there") from None
    if len(raw) < length or raw[: len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path}: truncated or not a client-state journal (expected "
                              f"{length} bytes starting with {MAGIC!r})")
    states: dict[int, bytes] = {}
    pos = len(MAGIC)
    view = memoryview(raw)
    while pos < length:
        if pos + _ENTRY.size > length:
            raise CheckpointError(f"{path}: entry header cut at byte {pos}; corrupted")
        key, size, crc = _ENTRY.unpack_from(view, pos)
        pos += _ENTRY.size
        if size < 0:
            states.pop(key, None)
            continue
        data = bytes(view[pos : pos + size])
        if len(data) != size or zlib.crc32(data) != crc:
            raise CheckpointError(f"{path}: client {key}'s state at byte {pos} fails its "
                                  "checksum; the journal is corrupted")
        states[key] = data
        pos += size
    return states


def remove_other_journals(folder: str | Path, keep: set[str]) -> None:
    """Delete journal generations no checkpoint refers to any more."""
    for path in Path(folder).glob("client_states.*.log"):
        if path.name not in keep and _NAME.fullmatch(path.name):
            with writing(path):
                path.unlink(missing_ok=True)
