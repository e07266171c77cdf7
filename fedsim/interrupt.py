"""Ctrl-C and SIGTERM end a command cleanly: one line saying how to continue, no traceback.

Inside :func:`signals_interrupt`, SIGINT and SIGTERM raise :class:`Interrupted` in the main
thread, so the run unwinds through its ``finally`` blocks (the client-state store closes, Ray
shuts down, Deployment Engine processes are stopped) while the checkpoints already on disk
stay as they are. The command's edge (``fedsim.cli``, ``python -m fedsim.engine.deploy``)
catches it, prints one ``interrupted:`` line built from the results folder (the round of its
newest checkpoint and the command that resumes it) and exits with 128 + the signal number
(130 for SIGINT, 143 for SIGTERM), as shells do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsim.errors import EXIT_ENGINE_FAILED
from fedsim.text import one_line

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM arrived; ``signum`` says which.

    A ``KeyboardInterrupt`` so that ``except Exception`` (a failing client turned into an
    error reply, a library's error handling) lets it through, as it does Ctrl-C.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    def __reduce__(self):  # crosses process boundaries (a sweep's worker processes)
        return Interrupted, (self.signum,)

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


@contextlib.contextmanager
def signals_interrupt(signums: Sequence[int] = SIGNALS) -> Iterator[None]:
    """Within the block, the first of ``signums`` raises :class:`Interrupted`; later ones are
    ignored, so the cleanup the first one starts is not cut short. Handlers are restored on
    exit. Nothing changes outside the main thread, or for a signal the process ignores (a
    shell's background job ignores SIGINT)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []

    def handler(signum: int, _frame) -> None:
        if arrived:
            return
        arrived.append(signum)
        raise Interrupted(signum)

    saved = {}
    for signum in signums:
        current = signal.getsignal(signum)
        if current is not signal.SIG_IGN:
            saved[signum] = current
            signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)


def checkpoint_round(folder: str | Path) -> int | None:
    """The round of the newest readable checkpoint in results folder ``folder``: the round
    ``fedsim run --resume`` continues after. None when there is none.

    Only the checkpoint's metadata is read (memory-mapped; its digest is checked by the
    resume itself, which falls back to the previous checkpoint as this does).
    """
    import torch  # heavy (as is fedsim.checkpoint): only needed once a run was interrupted

    from fedsim.checkpoint import FORMAT, LATEST, PREVIOUS

    for name in (LATEST, PREVIOUS):
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            payload = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
            if payload.get("format") == FORMAT:
                return int(json.loads(payload["tree"])["meta"]["round"])
        except Exception:  # damaged: the resume would use the previous one too
            continue
    return None


def command(argv: Sequence[str]) -> str:
    """``argv`` as one shell command line (quoted where needed)."""
    return shlex.join([str(a) for a in argv])


@dataclass(frozen=True)
class Continuation:
    """What a stopped run left in its folder and the command that continues it: ``kept``
    (None: nothing to resume), ``how`` ("resume with", "start it again with") and
    ``command`` (None: the run had finished)."""

    kept: str | None
    how: str
    command: str | None
    before_first_round: bool = False


def continuation(folder: str | Path, total_rounds: int, started: bool, checkpoint_every: int,
                 restart: Sequence[str], overwrite: str | None = "--overwrite"
                 ) -> Continuation:
    """How a run that stopped writing ``folder`` goes on, read from the folder itself.

    ``started``: the run recorded a round in ``folder`` or is a resume of it (a checkpoint
    found otherwise belongs to an older run); ``restart``: the command that starts it again
    when there is nothing to resume (with the ``overwrite`` flag added where the stopped run
    left its unfinished folder behind; None: the command overwrites anyway).
    """
    folder = Path(folder)
    if started and (folder / "summary.json").is_file():  # stopped after its last write
        return Continuation(f"the run had finished, its results are complete in {folder}",
                            "", None)
    again = list(restart)
    if started and not folder.is_dir():  # removed while the run wrote it
        return Continuation(f"{folder} is gone", "start it again with",
                            command(again))
    k = checkpoint_round(folder) if started else None
    if k is not None:
        return Continuation(f"round {k} of {total_rounds} complete, checkpoint in {folder}",
                            "resume with", command(["fedsim", "run", "--resume", folder]))
    unfinished = (folder / "scenario.toml").is_file() and not (folder / "summary.json").exists()
    if unfinished and overwrite is not None and overwrite not in again:
        again.append(overwrite)
    if not started:
        return Continuation(None, "start it again with", command(again),
                            before_first_round=True)
    why = ("output.checkpoint_every = 0" if checkpoint_every == 0
           else "stopped before its first checkpoint")
    return Continuation(f"no checkpoint in {folder} ({why})", "start it again with",
                        command(again))


def run_line(folder: str | Path, total_rounds: int, started: bool, checkpoint_every: int,
             restart: Sequence[str], overwrite: str | None = "--overwrite") -> str:
    """The one line an interrupted ``fedsim run`` (or deployed run) ends with (the arguments
    are :func:`continuation`'s)."""
    c = continuation(folder, total_rounds, started, checkpoint_every, restart, overwrite)
    if c.command is None:
        return f"interrupted: {c.kept}"
    if c.before_first_round:
        return f"interrupted before the first round; {c.how}: {c.command}"
    if c.how == "resume with":
        return f"interrupted: {c.kept}; {c.how}: {c.command}"
    return f"interrupted: {c.kept}, nothing to resume; {c.how}: {c.command}"


def exit_code(exc: Interrupted, line: str) -> int:
    """Print ``line`` on stderr and return the exit code for ``exc``."""
    return _end(line, exc.exit_code)


#: exit code of a run whose engine failed mid-run (``fedsim.errors.EngineFailed``)
ENGINE_FAILED = EXIT_ENGINE_FAILED


def failed_line(exc: BaseException, folder: str | Path | None = None) -> int:
    """Print the one ``error:`` line of a run whose engine failed (what failed, the newest
    checkpoint kept and the command that resumes from it) and return :data:`ENGINE_FAILED`.
    ``folder`` (default: the exception's own ``folder``): the run's results folder."""
    folder = folder if folder is not None else getattr(exc, "folder", None)
    line = f"error: {exc}"
    k = checkpoint_round(folder) if folder is not None else None
    if k is not None:
        line += (f"; the checkpoint of round {k} is kept in {folder}; resume with: "
                 f"{command(['fedsim', 'run', '--resume', folder])}")
    elif folder is not None:
        line += f"; no checkpoint in {folder} to resume from"
    return _end(line, ENGINE_FAILED)


def _end(line: str, code: int) -> int:
    """Print ``line`` (as one line, :func:`fedsim.text.one_line`) on stderr and return
    ``code``.

    A thread the stopped run could not end (Flower's ServerApp thread under Ray keeps
    waiting for replies from the stopped workers) would keep the interpreter from exiting;
    then, with everything else cleaned up, the process ends here.
    """
    print(one_line(line), file=sys.stderr, flush=True)
    sys.stdout.flush()
    lingering = [t for t in threading.enumerate()
                 if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if lingering:
        logging.shutdown()
        os._exit(code)
    return code
