"""Errors fedsim raises for bad input or unwritable results, so the CLI can print one
``error:`` line."""

import argparse
import errno
from typing import NoReturn


class ScenarioError(ValueError):
    """A scenario (file, override or derived value) is invalid; the message names the fix."""


class DataFormatError(ScenarioError):
    """A local dataset folder is missing files or holds files in the wrong format."""


class CheckpointError(ScenarioError):
    """A checkpoint is missing, truncated, corrupted or does not match its results folder."""


class RunStopped(ScenarioError):
    """A run stopped on purpose mid-way (diverged, too few clients answered); results so far
    are kept. ``round`` is the round that stopped it. ``kind`` names the reason for
    ``summary.json``; ``planned`` stops are clean ends (exit 0), the others failures."""

    kind = "failure"
    planned = False

    def __init__(self, message: str, round: int | None = None) -> None:  # noqa: A002
        super().__init__(message)
        self.round = round


class PrivacyBudgetSpent(RunStopped):
    """The next round would take ε above ``server.dp.max_epsilon``: a planned, clean end (the
    run's results are complete up to here and the command exits 0)."""

    kind = "privacy_budget"
    planned = True


class EarlyStopped(RunStopped):
    """The monitored metric (``[server.early_stop]``) stopped improving: a planned, clean end
    after the round that decided it (its results are complete; the command exits 0)."""

    kind = "early_stop"
    planned = True


#: exit code of a command that could not write its results (2 is bad input; 130 / 143 an
#: interrupt): the README's "Command line" section documents every code
EXIT_NOT_WRITTEN = 3
#: exit code of a run whose engine failed mid-run (:class:`EngineFailed`)
EXIT_ENGINE_FAILED = 4

_ADVICE = {
    errno.ENOSPC: "the disk is full; free space there",
    errno.EDQUOT: "the disk quota is used up; free space there",
    errno.EROFS: "the file system is read-only; make it writable",
    errno.EACCES: "no permission to write there; make the folder writable",
    errno.EPERM: "no permission to write there; make the folder writable",
    errno.ENOENT: "the folder is gone (removed while the command ran)",
}


class ResultsNotWritten(OSError):
    """Writing a results file failed: a full disk, a read-only, vanished or forbidden folder.

    ``path`` is the file (or folder) being written, ``cause`` the OSError the system raised;
    ``cell`` names the sweep cell that was writing, where there is one. The command's edge
    turns it into one ``error:`` line saying what was kept and how to continue, exit code
    :data:`EXIT_NOT_WRITTEN`. An OSError, so ``except OSError`` in a caller still sees it.
    """

    def __init__(self, path, cause: OSError, cell: str | None = None) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.path = str(path)
        self.cause = cause
        self.cell = cell

    def __reduce__(self):  # crosses process boundaries (a sweep's worker processes)
        return ResultsNotWritten, (self.path, OSError(self.errno, self.strerror), self.cell)

    @property
    def reason(self) -> str:
        """What the system said, with its errno name and what to do about it."""
        name = errno.errorcode.get(self.errno or 0)
        said = f"{self.strerror} ({name})" if name else str(self.strerror)
        advice = _ADVICE.get(self.errno or 0)
        return f"{said}: {advice}" if advice else said

    def __str__(self) -> str:
        who = f"sweep cell {self.cell}: " if self.cell else ""
        return f"{who}could not write {self.path}: {self.reason}"


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``error:`` line (exit 2), as every other
    bad input is, instead of the usage text and a second line (subparsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


class EngineFailed(RuntimeError):
    """The engine running the clients failed mid-run: a Ray actor or raylet died, a Deployment
    Engine process exited, an in-process worker thread raised. The run cannot go on; its
    results folder keeps the checkpoints written so far, so ``fedsim run --resume`` continues
    it once the engine is sound again. Not a ScenarioError: the scenario is fine, the machinery
    under it is not (the CLI exits 4, not 2). ``folder``: the run's results folder, once known.
    """

    def __init__(self, message: str, folder: str | None = None) -> None:
        super().__init__(message)
        self.folder = folder

    def __reduce__(self):  # crosses process boundaries (a sweep's worker processes)
        return EngineFailed, (str(self), self.folder)


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception ``exc`` was raised from (Flower wraps a Ray failure twice)."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc
