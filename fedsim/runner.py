"""The work behind :mod:`fedsim.run`: check a scenario, build its run context once,
preflight it, run its engine, record.

:mod:`fedsim.run` is the light public face (``import fedsim`` loads neither torch nor Flower
nor any registry); it imports this module on the first call that needs them. A run's data,
device and model factory (:class:`fedsim.context.RunContext`) are built here, once, and
handed to the ServerApp and the engine; nothing downstream rebuilds them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

from fedsim.checkpoint import load_checkpoint
from fedsim.config import Scenario
from fedsim.context import RunContext
from fedsim.engine import ENGINES, check_engine
from fedsim.errors import ScenarioError
from fedsim.lock import hold
from fedsim.report.record import RunRecorder
from fedsim.server.app import make_server_app
from fedsim.server.audits import check_audits
from fedsim.validate import (
    check_batch_statistics,
    check_bn_statistics,
    check_forward,
    check_names,
)


def check(scenario: Scenario) -> None:
    """The edge check: registry names and the combinations they allow (ScenarioError)."""
    check_names(scenario)


def preflight(scenario: Scenario | RunContext) -> RunContext:
    """Everything that can fail on bad input, done before anything is written or trained;
    returns the run's context (built here unless given)."""
    run = scenario if isinstance(scenario, RunContext) else RunContext.build(scenario)
    scenario, data = run.scenario, run.data
    model = run.new_model()
    check_forward(scenario, copy.deepcopy(model), data.input_shape)
    check_batch_statistics(scenario, copy.deepcopy(model), data.input_shape)
    check_bn_statistics(scenario, copy.deepcopy(model), data.input_shape)
    check_engine(run, model)
    check_audits(run)
    return run


def start(scn: Scenario, out: Path, overwrite: bool,
          progress: Callable[[dict], None] | None) -> tuple[dict, Path]:
    """Preflight ``scn``, then run it into a new results folder ``out``: (summary, folder)."""
    run = preflight(scn)
    with hold(out, "fedsim run"):  # one writer: locked before the folder is checked or cleared
        recorder = RunRecorder(out, overwrite=overwrite, progress=progress)
        recorder.prepare()
        return execute(run, recorder)


def resume(folder: Path, scn: Scenario, progress: Callable[[dict], None] | None,
           warn: Callable[[str], None]) -> tuple[dict, Path]:
    """Continue the run in ``folder`` (scenario ``scn``) from its last usable checkpoint."""
    ckpt = load_checkpoint(folder, scn, warn=warn)
    run = preflight(scn)
    return execute(run, RunRecorder(folder, progress=progress, resume=ckpt))


def execute(run: RunContext, recorder: RunRecorder) -> tuple[dict, Path]:
    """Run ``run``'s engine with its ServerApp and clients; (summary, results folder)."""
    scn = run.scenario
    engine = ENGINES.get(scn.engine.kind, key="engine.kind")
    engine(make_server_app(run, recorder), run)
    if recorder.stopped is not None:  # diverged / too few replies: results so far are kept
        raise recorder.stopped
    if recorder.summary is None:
        raise ScenarioError(f"the {scn.engine.kind} engine finished without a result")
    return recorder.summary, recorder.out
