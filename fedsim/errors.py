"""Errors fedsim raises for bad input, so the CLI can print one ``error:`` line."""


class ScenarioError(ValueError):
    """A scenario (file, override or derived value) is invalid; the message names the fix."""


class DataFormatError(ScenarioError):
    """A local dataset folder is missing files or holds files in the wrong format."""


class CheckpointError(ScenarioError):
    """A checkpoint is missing, truncated, corrupted or does not match its results folder."""


class RunStopped(ScenarioError):
    """A run stopped on purpose mid-way (diverged, too few clients answered); results so far
    are kept. ``round`` is the round that stopped it."""

    def __init__(self, message: str, round: int | None = None) -> None:  # noqa: A002
        super().__init__(message)
        self.round = round


class PrivacyBudgetSpent(RunStopped):
    """The next round would take ε above ``server.dp.max_epsilon``: a planned, clean end (the
    run's results are complete up to here and the command exits 0)."""


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


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception ``exc`` was raised from (Flower wraps a Ray failure twice)."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc
