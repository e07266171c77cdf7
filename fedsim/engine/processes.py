"""Find and stop every process a run started, including the ones that left its process group.

Flower's SuperLink starts its SuperExec in a new session, and Ray's workers outlive the
raylet that started them for a while; killing a process group misses both. Here a process
is named by its pid *and* start time (so a reused pid is never mistaken for it), a process
tree is read from ``/proc`` (or ``ps`` where there is none), and :func:`stop_processes`
sends SIGTERM, waits, then SIGKILLs what is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

_PROC = Path("/proc")


class Proc(NamedTuple):
    """A process: its pid and start time (clock ticks since boot; "" where unknown)."""

    pid: int
    start: str


def _stat(pid: int) -> tuple[int, int, str, str] | None:
    """(ppid, session, start time, state) of ``pid`` from /proc, or None if it is gone."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces
    return int(fields[1]), int(fields[3]), fields[19], fields[0]


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid → (parent pid, session id, start time) of every live (non-zombie) process."""
    table = {}
    if _PROC.is_dir():
        for entry in os.scandir(_PROC):
            if entry.name.isdigit() and (st := _stat(int(entry.name))) and st[3] != "Z":
                table[int(entry.name)] = st[:3]
        return table
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,stat=,lstart="], capture_output=True,
                         text=True, check=False).stdout
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4 and not parts[2].startswith("Z"):
            with contextlib.suppress(OSError):
                table[int(parts[0])] = (int(parts[1]), os.getsid(int(parts[0])), parts[3])
    return table


def descendants(roots: Iterable[int], table: dict | None = None) -> set[Proc]:
    """The live processes below ``roots`` (children, their children, ...), and every
    member of a session one of them leads (a detached grandchild's own children)."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    sessions = {pid for pid in found if table[pid][1] == pid} - {os.getsid(0)}
    found |= {pid for pid, (_, sid, _) in table.items() if sid in sessions}
    return {Proc(pid, table[pid][2]) for pid in found}


def alive(proc: Proc) -> bool:
    """True while ``proc`` runs (a zombie, or a new process with its pid, does not count)."""
    if _PROC.is_dir():
        st = _stat(proc.pid)
        return st is not None and st[2] == proc.start and st[3] != "Z"
    try:
        os.kill(proc.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return proc.pid in process_table()


def stop_processes(procs: Iterable[Proc], grace: float = 3.0) -> list[Proc]:
    """SIGTERM every process of ``procs`` still running, SIGKILL those left after ``grace``
    seconds, and wait (up to ``grace`` more) until they are gone; returns any that are not."""
    procs = list(procs)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        left = [p for p in procs if alive(p)]
        for p in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p.pid, sig)
        deadline = time.monotonic() + wait
        while (left := [p for p in left if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not left:
            return []
    return left


def find_proc(pid: int) -> Proc | None:
    """``pid`` as a :class:`Proc`, or None if no such process runs."""
    table = process_table()
    return Proc(pid, table[pid][2]) if pid in table else None


def stop_tree(roots: Iterable[Proc], grace: float = 3.0) -> list[Proc]:
    """Stop ``roots``, everything below them, and every process of a session one of them
    leads (see :func:`descendants`); rescans for processes started meanwhile (a SuperExec
    launching one more ClientApp). Returns any that could not be stopped."""
    roots = list(roots)
    sessions: set[int] = set()
    left: list[Proc] = []
    for _ in range(3):
        table = process_table()
        targets = {r for r in roots if alive(r)} | descendants([r.pid for r in roots], table)
        # sessions they lead (Flower's processes start their own); their members stay
        # members after the leader is gone
        sessions |= {p.pid for p in targets if p.pid in table and table[p.pid][1] == p.pid}
        sessions.discard(os.getsid(0))  # never this process's own (a terminal's) session
        targets |= {Proc(pid, start) for pid, (_, sid, start) in table.items()
                    if sid in sessions and pid != os.getpid()}
        if not targets:
            return []
        left = stop_processes(targets, grace)
    return left


class TreeWatch:
    """Notes, every ``interval`` seconds in a daemon thread and whenever :meth:`note` is
    called, the processes started below this one while the block runs, so that those
    orphaned when their parent exits (Ray's workers after ``ray.shutdown``) are still known
    to :meth:`stop`. Processes that were already there are left alone.

    Each look reads ``/proc`` for every process on the machine; a caller that knows when
    processes start (:mod:`fedsim.engine.ray_cohorts`: its actors) calls :meth:`note` then
    and polls rarely, since the reads slow the run's own processes down.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.seen: set[Proc] = set()
        self.before: set[Proc] = set()
        self._interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fedsim-tree-watch",
                                        daemon=True)

    def note(self) -> None:
        """Note the processes below this one now."""
        self.seen |= descendants([os.getpid()])

    def _watch(self) -> None:
        while True:
            self.note()
            if self._done.wait(self._interval):
                return

    def __enter__(self) -> TreeWatch:
        self.before = descendants([os.getpid()])
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def stop(self, grace: float = 3.0) -> list[Proc]:
        """Stop every noted process still running (see :func:`stop_processes`)."""
        started = (self.seen | descendants([os.getpid()])) - self.before
        return stop_processes(started, grace)
