"""The work behind :mod:`fedsim.run`: check a scenario, build its run context once,
preflight it, run its engine, record.

:mod:`fedsim.run` is the light public face (``import fedsim`` loads neither torch nor Flower
nor any registry); it imports this module on the first call that needs them. This is the
composition root of a run in this process: its data, device and model factory
(:class:`fedsim.context.RunContext`) and its result sinks (:class:`fedsim.sinks.RunSinks`:
the run folder, ``rounds.csv``, the scenario's ``output.sinks`` and what the caller adds,
such as the progress line) are built here, once, and handed to the ServerApp and the engine;
nothing downstream rebuilds them.
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from fedsim import files
from fedsim.checkpoint import load_checkpoint
from fedsim.config import Scenario
from fedsim.context import RunContext
from fedsim.engine import ENGINES, check_engine, check_engine_resources
from fedsim.errors import EngineFailed, ResultsNotWritten, ScenarioError, root_cause
from fedsim.lock import hold
from fedsim.server.app import make_server_app
from fedsim.server.audits import check_audits
from fedsim.sinks import (
    CallbackSink,
    ProgressLine,
    RunFolder,
    RunSinks,
    Sink,
    Tracking,
    check_packages,
    make_sinks,
)
from fedsim.validate import (
    check_batch_statistics,
    check_bn_statistics,
    check_forward,
    check_names,
)

#: where a run that failed mid-run keeps the traceback of what failed
ERROR_FILE = "error.txt"


def check(scenario: Scenario) -> None:
    """The edge check: registry names and the combinations they allow (ScenarioError)."""
    check_names(scenario)


def preflight(scenario: Scenario | RunContext,
              traced: dict[tuple, str | None] | None = None) -> RunContext:
    """Everything that can fail on bad input, done before anything is written or trained;
    returns the run's context (built here unless given). ``traced``: vectorize trace
    outcomes shared by the cells of one sweep (:func:`fedsim.engine.check_engine`)."""
    check_engine_resources(scenario.scenario if isinstance(scenario, RunContext) else scenario)
    run = scenario if isinstance(scenario, RunContext) else RunContext.build(scenario)
    scenario, data = run.scenario, run.data
    check_packages(scenario.output.sinks)  # a tracker's package, before anything runs
    model = run.new_model()
    check_forward(scenario, copy.deepcopy(model), data)
    check_batch_statistics(scenario, copy.deepcopy(model), data)
    check_bn_statistics(scenario, copy.deepcopy(model), data)
    check_engine(run, model, traced)
    check_audits(run)
    return run


def build_sinks(scn: Scenario, folder: RunFolder, progress: Callable[[dict], None] | None,
                show_progress: bool, extra: Sequence[Sink],
                tracking: Tracking | None) -> RunSinks:
    """The run's sinks: its folder, the scenario's ``output.sinks`` (with ``rounds.csv``),
    the progress line, then the caller's (sinks, a callback)."""
    sinks = [*make_sinks(scn), *([ProgressLine()] if show_progress else []), *extra]
    if progress is not None:
        sinks.append(CallbackSink(progress))
    return RunSinks(folder, sinks, tracking)


def start(scn: Scenario, out: Path, overwrite: bool,
          progress: Callable[[dict], None] | None, show_progress: bool = False,
          sinks: Sequence[Sink] = (), tracking: Tracking | None = None) -> tuple[dict, Path]:
    """Preflight ``scn``, then run it into a new results folder ``out``: (summary, folder)."""
    run = preflight(scn)
    with hold(out, "fedsim run"):  # one writer: locked before the folder is checked or cleared
        folder = RunFolder(out, overwrite=overwrite)
        folder.prepare()
        return execute(run, build_sinks(scn, folder, progress, show_progress, sinks, tracking))


def resume(folder: Path, scn: Scenario, progress: Callable[[dict], None] | None,
           warn: Callable[[str], None], show_progress: bool = False,
           sinks: Sequence[Sink] = (), tracking: Tracking | None = None) -> tuple[dict, Path]:
    """Continue the run in ``folder`` (scenario ``scn``) from its last usable checkpoint."""
    ckpt = load_checkpoint(folder, scn, warn=warn)
    run = preflight(scn)
    return execute(run, build_sinks(scn, RunFolder(folder, resume=ckpt), progress,
                                    show_progress, sinks, tracking))


def execute(run: RunContext, sinks: RunSinks) -> tuple[dict, Path]:
    """Run ``run``'s engine with its ServerApp and clients; (summary, results folder).

    An exception that ends the engine mid-run (a worker thread raising, a Ray process lost;
    not bad input, a ScenarioError, a results file that could not be written, nor an
    interrupt) becomes one :class:`EngineFailed` naming the round and the cause, and the
    checkpoints in the results folder stay as they were (``fedsim run --resume`` continues
    from the newest); an exception no engine explained leaves its traceback in ``error.txt``
    there. Every sink hears the exception the run ends with (:meth:`RunSinks.error`).
    """
    scn = run.scenario
    engine = ENGINES.get(scn.engine.kind, key="engine.kind")
    try:
        engine(make_server_app(run, sinks), run)
    except BaseException as exc:  # a crash or an interrupt: trackers mark their runs so
        ended = _ended_by(scn.engine.kind, exc, sinks)
        sinks.error(ended)
        if ended is exc:
            raise
        raise ended from exc
    if sinks.failure is not None:  # diverged / too few replies: results so far are kept
        raise sinks.failure
    if sinks.summary is None:
        raise ScenarioError(f"the {scn.engine.kind} engine finished without a result")
    return sinks.summary, sinks.out


def _ended_by(kind: str, exc: BaseException, sinks: RunSinks) -> BaseException:
    """What the run raises for ``exc``: bad input, a results write fault (exit 3) and an
    interrupt as they are (a write fault wrapped by an engine unwrapped); any other
    exception as one :class:`EngineFailed` (exit 4, :func:`_failed`)."""
    if not isinstance(exc, Exception) or isinstance(exc, (ScenarioError, ResultsNotWritten)):
        return exc
    cause = root_cause(exc)
    if isinstance(cause, ResultsNotWritten):  # the ServerApp's own write, wrapped by Flower
        return cause
    return _failed(kind, exc, sinks)


def _failed(kind: str, exc: Exception, sinks: RunSinks) -> EngineFailed:
    """One EngineFailed for ``exc``, raised mid-run: the round, the engine, what failed. An
    engine's own EngineFailed says what died; anything else is named by its innermost cause,
    and its traceback is kept in ``error.txt``."""
    done = max((r.get("round", 0) for r in sinks.rounds), default=None)
    when = f"in round {done + 1}" if done is not None else "before its first round"
    if isinstance(exc, EngineFailed):
        what, note = str(exc), ""
    else:
        cause = root_cause(exc)
        what, note = f"{type(cause).__name__}: {cause}", ""
        if sinks.out.is_dir():
            try:
                files.write_text(sinks.out / ERROR_FILE,
                                 "".join(traceback.format_exception(exc)))
                note = f" (traceback in {sinks.out / ERROR_FILE})"
            except ResultsNotWritten:  # the failure is still told, without its traceback
                note = ""
    return EngineFailed(f"the run failed {when} on the {kind} engine: {what}{note}",
                        str(sinks.out))
