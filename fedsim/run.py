"""Python API: ``fedsim.run(scenario)`` for notebooks and scripts, and the edge check.

A scenario is parsed by :mod:`fedsim.config` (keys, types, ranges); its registry names are
checked here, by :func:`check` (``resolve`` and ``resume`` call it), before anything trains.
This module stays light — ``import fedsim`` loads neither torch nor Flower nor any
registry — and hands the work to :mod:`fedsim.runner`, imported on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from fedsim.config import Scenario, load_scenario, replace
from fedsim.errors import ScenarioError
from fedsim.lock import hold

if TYPE_CHECKING:  # the sinks import torch: only their names here
    from fedsim.sinks import Sink, Tracking


@dataclass(frozen=True)
class RunResult:
    summary: dict
    path: Path


def _runner() -> ModuleType:
    # late binding: fedsim.runner imports torch, Flower and every registry (seconds), which
    # `import fedsim`, `import fedsim.config` and `fedsim --help` must not pay for
    from fedsim import runner

    return runner


def check(scenario: Scenario) -> Scenario:
    """``scenario`` once its registry names (dataset, partition, arch, norm, strategy,
    engine, ...) and the combinations they allow are checked; ScenarioError otherwise."""
    _runner().check(scenario)
    return scenario


def resolve(scenario: Scenario | str | Path, overrides: Sequence[str] = ()) -> Scenario:
    """A checked Scenario from a path or an existing Scenario, with overrides applied."""
    if isinstance(scenario, Scenario):
        return check(replace(scenario, list(overrides)) if overrides else scenario)
    return check(load_scenario(scenario, list(overrides)))


def preflight(scenario: Scenario, traced: dict[tuple, str | None] | None = None) -> None:
    """Everything that can fail on bad input, done before anything is written or trained.

    ``traced``: a dict the caller keeps across scenarios that share model and data shapes
    (a sweep's cells), so the vectorize trace check runs once per distinct model.
    """
    _runner().preflight(scenario, traced)


def run(
    scenario: Scenario | str | Path,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[dict], None] | None = None,
    show_progress: bool = False,
    sinks: Sequence[Sink] = (),
    tracking: Tracking | None = None,
) -> RunResult:
    """Run one federation; returns its summary (as in summary.json) and results folder.

    ``progress`` hears each round's record; ``show_progress`` prints the progress line on
    stderr (as ``fedsim run`` does); ``sinks`` (:class:`fedsim.sinks.Sink`) hear the run
    besides the scenario's ``output.sinks``; ``tracking`` joins the run's trackers to a
    larger study (a sweep sets it). Raises :class:`fedsim.errors.ScenarioError` for bad
    input before anything is written, or when another process writes ``out``
    (:class:`fedsim.lock.FolderBusy`).
    """
    scn = resolve(scenario, overrides)
    return RunResult(*_runner().start(scn, Path(out or scn.output.dir), overwrite, progress,
                                      show_progress, sinks, tracking))


def resume(
    folder: str | Path,
    progress: Callable[[dict], None] | None = None,
    warn: Callable[[str], None] = lambda msg: None,
    show_progress: bool = False,
    sinks: Sequence[Sink] = (),
    tracking: Tracking | None = None,
) -> RunResult:
    """Continue the interrupted run in results folder ``folder`` from its last checkpoint.

    The scenario is the folder's own ``scenario.toml``; the result equals that of an
    uninterrupted run (bitwise on CPU). ``warn`` hears about a damaged newest checkpoint
    when an older one is used instead. A folder another process writes is refused
    (:class:`fedsim.lock.FolderBusy`, a ScenarioError).
    """
    folder = Path(folder)
    toml = folder / "scenario.toml"
    if not toml.is_file():
        raise ScenarioError(
            f"--resume {str(folder)!r}: not a fedsim results folder (no scenario.toml)")
    # one writer: locked before the checkpoint is read and rounds.jsonl cut back to it
    with hold(folder, "fedsim run --resume", create=False):
        if (folder / "summary.json").exists():
            raise ScenarioError(
                f"--resume {str(folder)!r}: this run already finished (summary.json exists); "
                "nothing to resume")
        scn = check(load_scenario(toml))
        return RunResult(*_runner().resume(folder, scn, progress, warn, show_progress, sinks,
                                           tracking))
