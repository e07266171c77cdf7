"""The work behind :mod:`fedsim.run`: check a scenario, preflight it, run its engine, record.

:mod:`fedsim.run` is the light public face (``import fedsim`` loads neither torch nor Flower
nor any registry); it imports this module on the first call that needs them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

from fedsim.checkpoint import load_checkpoint
from fedsim.client.app import make_client_app
from fedsim.client.runtime import build_global_model
from fedsim.config import Scenario
from fedsim.data.federated import build_federated_data
from fedsim.device import resolve_device
from fedsim.engine import ENGINES, check_engine
from fedsim.errors import ScenarioError
from fedsim.privacy.audit import check_privacy
from fedsim.report.record import RunRecorder
from fedsim.server.app import make_server_app
from fedsim.validate import check_batch_statistics, check_forward, check_names


def check(scenario: Scenario) -> None:
    """The edge check: registry names and the combinations they allow (ScenarioError)."""
    check_names(scenario)


def preflight(scenario: Scenario) -> None:
    """Everything that can fail on bad input, done before anything is written or trained."""
    resolve_device(scenario.engine.device)
    data = build_federated_data(scenario)
    model = build_global_model(scenario, data)
    check_forward(scenario, copy.deepcopy(model), data.input_shape)
    check_batch_statistics(scenario, copy.deepcopy(model), data.input_shape)
    check_engine(scenario, model)
    if scenario.privacy.enabled:
        check_privacy(scenario, data)


def start(scn: Scenario, out: Path, overwrite: bool,
          progress: Callable[[dict], None] | None) -> tuple[dict, Path]:
    """Preflight ``scn``, then run it into a new results folder ``out``: (summary, folder)."""
    preflight(scn)
    recorder = RunRecorder(out, overwrite=overwrite, progress=progress)
    recorder.prepare()
    return execute(scn, recorder)


def resume(folder: Path, scn: Scenario, progress: Callable[[dict], None] | None,
           warn: Callable[[str], None]) -> tuple[dict, Path]:
    """Continue the run in ``folder`` (scenario ``scn``) from its last usable checkpoint."""
    ckpt = load_checkpoint(folder, scn, warn=warn)
    preflight(scn)
    return execute(scn, RunRecorder(folder, progress=progress, resume=ckpt))


def execute(scn: Scenario, recorder: RunRecorder) -> tuple[dict, Path]:
    """Run ``scn``'s engine with its ServerApp and ClientApp; (summary, results folder)."""
    engine = ENGINES.get(scn.engine.kind, key="engine.kind")
    engine(make_server_app(scn, recorder), make_client_app(scn), scn)
    if recorder.stopped is not None:  # diverged / too few replies: results so far are kept
        raise recorder.stopped
    if recorder.summary is None:
        raise ScenarioError(f"the {scn.engine.kind} engine finished without a result")
    return recorder.summary, recorder.out
