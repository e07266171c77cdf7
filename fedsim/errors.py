"""Errors fedsim raises for bad input, so the CLI can print one ``error:`` line."""


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
