"""Errors fedsim raises for bad input, so the CLI can print one ``error:`` line."""


class ScenarioError(ValueError):
    """A scenario (file, override or derived value) is invalid; the message names the fix."""


class DataFormatError(ScenarioError):
    """A local dataset folder is missing files or holds files in the wrong format."""
