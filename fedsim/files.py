"""Files written whole or not at all: a temporary name in the same folder, flushed, renamed.

An interruption (a signal, a full disk, a crash) at any point leaves the old file or the new
one, never a torn one: ``os.replace`` within one folder is atomic on POSIX and Windows. The
temporary name carries the writer's pid, so two processes never write the same temporary
file, and it is removed when the write fails. Every file fedsim writes into a results folder
goes through here (checkpoints, summaries, reports, tables, plots).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in ``path`` durable (where the OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_name(path: str | Path) -> Path:
    """The temporary file :func:`atomic_write` writes ``path`` through (same folder)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` whole: ``write(fh)`` fills a temporary file beside it (binary mode),
    which is flushed, synced and renamed over ``path``. On any exception (``KeyboardInterrupt``
    and fedsim's ``Interrupted`` included) the temporary file is removed, ``path`` keeps its
    old content, and the exception propagates."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """``path`` holds ``data``, atomically."""
    return atomic_write(path, lambda fh: fh.write(data))


def write_text(path: str | Path, text: str) -> Path:
    """``path`` holds ``text`` (UTF-8), atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """``path`` holds ``json.dumps(obj, **dumps)`` and a final newline, atomically."""
    return write_text(path, json.dumps(obj, **dumps) + "\n")


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` into ``path``, atomically."""
    import torch  # heavy: only the writers that save tensors pay for it

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def save_figure(fig: Any, path: str | Path, **savefig: Any) -> Path:
    """A matplotlib figure saved into ``path`` (format from its suffix), atomically."""
    fmt = savefig.pop("format", None) or Path(path).suffix.lstrip(".") or None
    return atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, **savefig))
