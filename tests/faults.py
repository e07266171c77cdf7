"""A disk that fails on cue, for the tests of what a failed or interrupted write leaves.

:class:`Fault` makes the ``nth`` write of a file whose name matches fail the way the system
would make it fail — ``open`` refused (EACCES, EROFS), ``write`` refused (ENOSPC), the folder
removed under the writer (a real ENOENT) — or raises fedsim's ``Interrupted`` (a SIGTERM)
there instead. It patches the primitives every writer ends in (``open`` in a writing mode,
``os.open``, ``os.mkdir``, ``os.link``, ``os.replace``, ``os.unlink``), so it tests the code
as it is, whichever helper a write site calls.
"""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import signal
from pathlib import Path

from fedsim.interrupt import Interrupted

WRITE_MODES = set("wax+")


def matches(pattern: str, path) -> bool:
    """Whether ``path`` is the file ``pattern`` names, or the temporary file an atomic write
    of it goes through (``.NAME.<pid>.tmp``)."""
    name = Path(os.fsdecode(path)).name
    return name == pattern or (name.startswith(f".{pattern}.") and name.endswith(".tmp"))


class _FailingWrites:
    """A file object whose writes fail with ``error`` (the disk filled up) once ``ok``
    writes went through."""

    def __init__(self, fh, error, ok: int = 0) -> None:
        self._fh = fh
        self._error = error
        self._ok = ok

    def write(self, data):
        if self._ok > 0:
            self._ok -= 1
            return self._fh.write(data)
        raise self._error()

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


class Fault:
    """The ``nth`` write of a file named ``name`` fails with ``how``.

    ``how``: an errno name (``"ENOSPC"`` fails the writes into the opened file; ``"EACCES"``,
    ``"EROFS"``, ``"EPERM"`` refuse the open; ``"ENOENT"`` removes ``gone`` — the results
    folder — and lets the open fail for real), or ``"SIGTERM"`` (raise ``Interrupted`` at
    the open) or ``"SIGTERM-after"`` (after the rename that completes the file).
    ``op``: which primitive counts as the write: ``"open"`` (also ``os.open``), ``"mkdir"``,
    ``"link"``, ``"replace"`` (the rename onto ``name``) or ``"unlink"``. ``writes_ok``: with
    ENOSPC, the writes into the opened file that still fit.
    """

    def __init__(self, name: str, how: str = "ENOSPC", nth: int = 1, op: str = "open",
                 gone: Path | None = None, writes_ok: int = 0) -> None:
        self.name, self.how, self.nth, self.op, self.gone = name, how, nth, op, gone
        self.writes_ok = writes_ok
        self.seen = 0
        self.fired = False

    def _error(self, path=None) -> OSError:
        code = getattr(errno, self.how)
        return OSError(code, os.strerror(code), None if path is None else os.fsdecode(path))

    def _due(self, path) -> bool:
        if self.fired or not matches(self.name, path):
            return False
        self.seen += 1
        return self.seen == self.nth

    def _before(self, path, file_object: bool = False) -> bool:
        """Act before the primitive runs; True: it then runs and the file object it opens
        fails to write (``file_object``: it opens one)."""
        self.fired = True
        if self.how == "SIGTERM":
            raise Interrupted(signal.SIGTERM)
        if self.how == "ENOENT":
            shutil.rmtree(self.gone)
            return False
        if self.how == "ENOSPC" and file_object:
            return True
        if self.how == "SIGTERM-after":
            return False
        raise self._error(path)

    def install(self, monkeypatch) -> Fault:
        real_open, real_os_open = builtins.open, os.open
        real = {"mkdir": os.mkdir, "link": os.link, "replace": os.replace, "unlink": os.unlink}

        def fake_open(file, mode="r", *args, **kwargs):
            fail = False
            if (self.op == "open" and isinstance(file, (str, bytes, os.PathLike))
                    and WRITE_MODES & set(mode) and self._due(file)):
                fail = self._before(file, file_object=True)
            fh = real_open(file, mode, *args, **kwargs)
            if fail:
                return _FailingWrites(fh, lambda: self._error(file), self.writes_ok)
            return fh

        def fake_os_open(path, flags, *args, **kwargs):
            if (self.op == "open" and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
                    and self._due(path)):
                self._before(path)
            return real_os_open(path, flags, *args, **kwargs)

        def primitive(op):
            def call(*args, **kwargs):
                target = args[0] if op in ("mkdir", "unlink") else args[1]  # what it changes
                due = self.op == op and self._due(target)
                if due and self.how != "SIGTERM-after":
                    self._before(target)
                result = real[op](*args, **kwargs)
                if due and self.how == "SIGTERM-after":
                    self.fired = True
                    raise Interrupted(signal.SIGTERM)
                return result
            return call

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
        for op in real:
            monkeypatch.setattr(os, op, primitive(op))
        return self
