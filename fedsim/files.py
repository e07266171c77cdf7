"""Files written whole or not at all: a temporary name in the same folder, flushed, renamed.

An interruption (a signal, a full disk, a crash) at any point leaves the old file or the new
one, never a torn one: ``os.replace`` within one folder is atomic on POSIX and Windows. The
temporary name carries the writer's pid, so two processes never write the same temporary
file, and it is removed when the write fails. Every file fedsim writes into a results folder
goes through here (checkpoints, summaries, reports, tables, plots); so do the appends to
``rounds.jsonl`` and the folder operations around them.

Every failure to write (a full disk, a read-only, vanished or forbidden folder) leaves here
as :class:`fedsim.errors.ResultsNotWritten` naming the file, also when the system's OSError
surfaced wrapped in another exception (``torch.save`` raises a RuntimeError from it), so a
command can end in one line that says what was kept (:mod:`fedsim.cli`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from fedsim.errors import ResultsNotWritten

#: what ``os.link`` raises where a file system has no hard links (FAT, some network mounts)
_NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS,
                  getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.EOPNOTSUPP}


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError ``exc`` is or was raised from (its cause or context chain), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Within the block, a failure to write (an OSError, or an exception raised from one)
    becomes :class:`ResultsNotWritten` naming ``path``; anything else passes unchanged."""
    try:
        yield
    except ResultsNotWritten:
        raise
    except Exception as exc:
        cause = os_error_in(exc)
        if cause is None:
            raise
        raise ResultsNotWritten(path, cause) from exc


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
    with writing(path):
        try:
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # a vanished or read-only folder
                tmp.unlink(missing_ok=True)
            raise
    fsync_dir(path.parent)
    return path


def append_text(path: str | Path, text: str) -> Path:
    """Append ``text`` (UTF-8) to ``path``, flushed. Not atomic: a failure can leave part of
    it, so an append-only file's reader keeps what its writer recorded as complete (a
    checkpoint records the byte length of ``rounds.jsonl`` it covers)."""
    path = Path(path)
    with writing(path), open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
    return path


def truncate(path: str | Path, size: int) -> Path:
    """Cut ``path`` back to its first ``size`` bytes."""
    path = Path(path)
    with writing(path), open(path, "r+b") as fh:
        fh.truncate(size)
    return path


def sync_size(path: str | Path) -> int:
    """Flush ``path`` to disk; its size in bytes."""
    path = Path(path)
    with writing(path), open(path, "rb+") as fh:
        os.fsync(fh.fileno())
        return fh.seek(0, os.SEEK_END)


def make_folder(path: str | Path) -> Path:
    """``path`` and its parents, created where missing."""
    path = Path(path)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def keep_copy(src: str | Path, dst: str | Path) -> Path:
    """``dst`` holds what ``src`` holds, atomically, and ``src`` stays: a hard link renamed
    over ``dst`` (no bytes copied), or a copy where the file system has no hard links."""
    src, dst = Path(src), Path(dst)
    tmp = temporary_name(dst)
    with writing(dst):
        try:
            tmp.unlink(missing_ok=True)
            try:
                os.link(src, tmp)
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                with open(src, "rb") as fh_src:
                    atomic_write(dst, lambda fh: shutil.copyfileobj(fh_src, fh, 2**20))
                return dst
            os.replace(tmp, dst)
            # a rename between two links of one file does nothing (POSIX): dst already is src
            tmp.unlink(missing_ok=True)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
    fsync_dir(dst.parent)
    return dst


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
