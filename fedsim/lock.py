"""One writer per results folder: an advisory lock on ``.fedsim.lock`` inside the folder.

Two fedsim processes writing one folder corrupt it: a ``--resume`` cuts ``rounds.jsonl``
back to its checkpoint while the first run still appends, and both then append rounds in
turn. Every command that writes a folder — ``fedsim run`` (and ``--resume``), each sweep cell
(in the worker process that runs it), the sweep folder itself, ``fedsim report`` — holds
:func:`hold` on it before it reads or changes anything there; a second writer gets
:class:`FolderBusy` (one ``error:`` line naming the folder and the process that holds it,
exit 2) and leaves the folder as it was.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on the open lock file: the kernel releases it when
the process ends, however it ends (SIGKILL, a crash, a lost terminal), so a lock is never
stale. The file holds the holder's pid and command, read by the refused writer for its
message, and is removed when the lock is released (a killed holder leaves the file, unlocked:
the next writer takes it). A writer that opened the file just before its holder removed it
sees, once it has the lock, that the path no longer names its file and starts over, so two
processes never both believe they hold a folder. Within one process the lock is re-entrant
(a sweep cell holds its folder and the run inside it takes it again).

POSIX only (Linux, macOS; ``fcntl``): Windows is not a target. On a network file system the
lock holds where the file system implements ``flock`` (Linux NFS does, as a byte-range lock).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from fedsim.errors import ScenarioError
from fedsim.files import make_folder, writing
from fedsim.text import one_line

try:
    import fcntl
except ImportError:  # Windows: not a target (see the module docstring)
    fcntl = None

LOCK_NAME = ".fedsim.lock"
CLEARING = ".fedsim-clearing"  # where :func:`clear` moves a folder's entries to delete them


class FolderBusy(ScenarioError):
    """Another process writes the folder (it holds the folder's lock)."""


#: folders this process holds: resolved path -> [lock file descriptor, depth]
_HELD: dict[Path, list[int]] = {}


def _key(folder: Path) -> Path:
    return folder.resolve()


def held(folder: str | Path) -> bool:
    """Whether this process holds ``folder``'s lock."""
    return _key(Path(folder)) in _HELD


def held_folders() -> list[Path]:
    """The folders whose locks this process holds."""
    return sorted(_HELD)


def _printable(text: str, limit: int = 200) -> str:
    """``text`` on one line (:func:`fedsim.text.one_line`), at most ``limit`` characters."""
    text = one_line(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def holder(folder: str | Path) -> str:
    """Who holds ``folder``'s lock, as its lock file says: ``pid N (what: command)``."""
    try:
        info = json.loads((Path(folder) / LOCK_NAME).read_text(encoding="utf-8"))
        pid, what, cmd = int(info["pid"]), str(info["what"]), str(info.get("command") or "")
    except (OSError, ValueError, KeyError, TypeError):  # written this very moment
        return "a process that has not yet written its pid"
    return f"pid {pid} ({_printable(what)}{': ' + _printable(cmd) if cmd else ''})"


def _open_locked(folder: Path, what: str) -> int:
    """The descriptor of ``folder``'s lock file, locked by this process; FolderBusy if another
    process holds it."""
    path = folder / LOCK_NAME
    while True:
        with writing(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise FolderBusy(
                        f"{str(folder)!r} is being written by another fedsim process, "
                        f"{holder(folder)}; wait for it to end (or stop it), or write "
                        "elsewhere (--out DIR)") from None
                raise ScenarioError(  # e.g. ENOLCK: a network file system without locks
                    f"cannot lock {str(folder)!r} ({exc.strerror}): fedsim needs a file "
                    "system with flock to keep one writer per results folder; write to a "
                    "local disk (--out DIR)") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:  # its holder removed it as we opened it
            same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        argv = sys.orig_argv  # a worker process's own is multiprocessing's: ``what`` says it
        command = "" if "--multiprocessing-fork" in argv else shlex.join(argv)
        info = {"pid": os.getpid(), "what": what, "command": command,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with writing(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
    except BaseException:
        _release(path, fd)
        raise
    return fd


def _release(path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):  # already gone with its folder
        path.unlink()
    os.close(fd)


@contextlib.contextmanager
def hold(folder: str | Path, what: str, create: bool = True) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block (``what``: the command, e.g. ``"fedsim run"``,
    shown to a writer it refuses). ``create``: make the folder if it is missing (else a
    missing folder is a ScenarioError). Re-entrant within this process."""
    if fcntl is None:
        raise ScenarioError("fedsim needs POSIX file locks (fcntl) to guard its results "
                            "folders; run it on Linux or macOS (Windows is not supported)")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ScenarioError(f"{str(folder)!r} exists and is not a folder; use --out DIR")
    if not folder.is_dir():
        if not create:
            raise ScenarioError(f"{str(folder)!r}: no such folder")
        make_folder(folder)
    key = _key(folder)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield folder
        finally:
            _HELD[key][1] -= 1
        return
    fd = _open_locked(folder, what)
    _HELD[key] = [fd, 1]
    try:
        yield folder
    finally:
        del _HELD[key]
        _release(folder / LOCK_NAME, fd)


def is_empty(folder: str | Path) -> bool:
    """Whether ``folder`` holds nothing but (possibly) a lock file."""
    return not any(p.name != LOCK_NAME for p in Path(folder).iterdir())


def clear(folder: str | Path, what: str, first: Sequence[str] = ("summary.json",)) -> None:
    """Remove everything in ``folder`` (whose lock this process holds) but its lock file.

    Each sub-folder (a sweep's cell), and any deeper one with a lock file, is locked before
    it is removed, so a folder another process writes is never removed under it
    (FolderBusy). Entries are first moved, one rename each, into a hidden folder that is
    then deleted, the files that mark a folder finished (``first``) before the rest: a clear
    that fails part-way never leaves a folder that looks finished with parts missing.
    """
    folder = Path(folder)
    if not held(folder):
        raise RuntimeError(f"clearing {folder} needs its lock held")
    trash = folder / CLEARING
    with contextlib.ExitStack() as locks:
        subs = {p for p in folder.iterdir()
                if p.is_dir() and not p.is_symlink() and p.name != CLEARING}
        subs |= {lock.parent for lock in folder.glob(f"*/*/**/{LOCK_NAME}")}
        for sub in sorted(subs):
            locks.enter_context(hold(sub, what, create=False))
        entries = sorted((p for p in folder.iterdir() if p.name not in (LOCK_NAME, CLEARING)),
                         key=lambda p: (p.name not in first, p.name))
        try:
            with writing(trash):
                if trash.exists():  # left by a clear that failed
                    shutil.rmtree(trash)
                trash.mkdir()
            for entry in entries:
                with writing(entry):
                    os.replace(entry, trash / entry.name)
        finally:  # what was moved goes, also after a failed move
            shutil.rmtree(trash, ignore_errors=True)
        if trash.exists():
            with writing(trash):
                shutil.rmtree(trash)
