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
    from fedsim.validate import check_batch_statistics

    resolve_device(scenario.engine.device)
    data = build_federated_data(scenario)
    model = build_global_model(scenario, data)
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
    from fedsim.client.app import make_client_app
    from fedsim.engine import ENGINES
    from fedsim.report.record import RunRecorder
    from fedsim.server.app import make_server_app

    scn = resolve(scenario, overrides)
    preflight(scn)
    recorder = RunRecorder(Path(out or scn.output.dir), overwrite=overwrite, progress=progress)
    recorder.prepare()
    engine = ENGINES.get(scn.engine.kind, key="engine.kind")
    engine(make_server_app(scn, recorder), make_client_app(scn), scn)
    if recorder.summary is None:
        raise ScenarioError(f"the {scn.engine.kind} engine finished without a result")
    return RunResult(recorder.summary, recorder.out)
