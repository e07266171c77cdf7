"""Python API: ``fedsim.run(scenario)`` for notebooks and scripts."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsim.config import Scenario, load_scenario, replace
from fedsim.errors import ScenarioError


@dataclass(frozen=True)
class RunResult:
    summary: dict
    path: Path


def resolve(scenario: Scenario | str | Path, overrides: Sequence[str] = ()) -> Scenario:
    """A validated Scenario from a path or an existing Scenario, with overrides applied."""
    if isinstance(scenario, Scenario):
        return replace(scenario, list(overrides)) if overrides else scenario
    return load_scenario(scenario, list(overrides))


def preflight(scenario: Scenario) -> None:
    """Everything that can fail on bad input, done before anything is written or trained."""
    from fedsim.client.runtime import build_global_model
    from fedsim.data.federated import build_federated_data
    from fedsim.device import resolve_device
    from fedsim.validate import check_batch_statistics, check_forward

    resolve_device(scenario.engine.device)
    data = build_federated_data(scenario)
    model = build_global_model(scenario, data)
    check_forward(scenario, copy.deepcopy(model), data.input_shape)
    check_batch_statistics(scenario, copy.deepcopy(model), data.input_shape)
    from fedsim.engine import check_engine

    check_engine(scenario, model)
    if scenario.privacy.enabled:
        from fedsim.privacy.audit import check_privacy

        check_privacy(scenario, data)


def run(
    scenario: Scenario | str | Path,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[dict], None] | None = None,
) -> RunResult:
    """Run one federation; returns its summary (as in summary.json) and results folder.

    Raises :class:`fedsim.errors.ScenarioError` for bad input before anything is written.
    """
    from fedsim.report.record import RunRecorder

    scn = resolve(scenario, overrides)
    preflight(scn)
    recorder = RunRecorder(Path(out or scn.output.dir), overwrite=overwrite, progress=progress)
    recorder.prepare()
    return _execute(scn, recorder)


def _execute(scn: Scenario, recorder) -> RunResult:
    from fedsim.client.app import make_client_app
    from fedsim.engine import ENGINES
    from fedsim.server.app import make_server_app

    engine = ENGINES.get(scn.engine.kind, key="engine.kind")
    engine(make_server_app(scn, recorder), make_client_app(scn), scn)
    if recorder.stopped is not None:  # diverged / too few replies: results so far are kept
        raise recorder.stopped
    if recorder.summary is None:
        raise ScenarioError(f"the {scn.engine.kind} engine finished without a result")
    return RunResult(recorder.summary, recorder.out)


def resume(
    folder: str | Path,
    progress: Callable[[dict], None] | None = None,
    warn: Callable[[str], None] = lambda msg: None,
) -> RunResult:
    """Continue the interrupted run in results folder ``folder`` from its last checkpoint.

    The scenario is the folder's own ``scenario.toml``; the result equals that of an
    uninterrupted run (bitwise on CPU). ``warn`` hears about a damaged newest checkpoint
    when an older one is used instead.
    """
    from fedsim.checkpoint import load_checkpoint
    from fedsim.report.record import RunRecorder

    folder = Path(folder)
    toml = folder / "scenario.toml"
    if not toml.is_file():
        raise ScenarioError(
            f"--resume {str(folder)!r}: not a fedsim results folder (no scenario.toml)")
    if (folder / "summary.json").exists():
        raise ScenarioError(
            f"--resume {str(folder)!r}: this run already finished (summary.json exists); "
            "nothing to resume")
    scn = load_scenario(toml)
    ckpt = load_checkpoint(folder, scn, warn=warn)
    preflight(scn)
    return _execute(scn, RunRecorder(folder, progress=progress, resume=ckpt))
