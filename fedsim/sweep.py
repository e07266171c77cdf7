"""``fedsim sweep``: run every combination of a scenario's ``[sweep]`` grid, then report.

Each cell is an ordinary run with its own results folder under the sweep folder
(``output.dir`` or ``--out``), named after its axis values, e.g.
``norm-bn__batch_size-4__seed-0``. The sweep is resumable: a cell whose folder holds a
``summary.json`` is not run again (its ``scenario.toml`` must match, or the sweep stops with
an error rather than mix results of two scenarios); an interrupted cell resumes from its
last checkpoint (``fedsim.resume``), so it loses at most one round, and a cell never started
(or whose checkpoints are unusable) runs from scratch. When all cells are done,
``report.md`` is (re)written, testing the scenario's ``[[claims]]``
(:mod:`fedsim.report.claims`); the claims stay with the sweep, cells carry none.

With ``[sweep.tune]`` the sweep runs in two phases through the same worker pool: first the
tuning cells (``tune/...``: every arm at every grid value on each tuning seed,
:func:`fedsim.cells.tune_cells`), which may stop early (a diverging learning rate is a
result, not an error); then, once all are done, the reported cells at the values chosen for
their arm on the validation split (:mod:`fedsim.report.tuning`). Both phases resume alike.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import tomli_w

from fedsim.cells import (  # noqa: F401  (cell_name, flat_keys: part of this module's API)
    Cell,
    Ticker,
    TuneCell,
    cell_name,
    check_size,
    expand,
    flat_keys,
    followers,
    grid_points,
    tune_cells,
    tune_points,
    with_choices,
)
from fedsim.config import Scenario, load_scenario, scenario_from_dict
from fedsim.errors import (
    CheckpointError,
    EngineFailed,
    ResultsNotWritten,
    RunStopped,
    ScenarioError,
)
from fedsim.files import make_folder, write_json, write_text
from fedsim.interrupt import Interrupted, checkpoint_round, command, signals_interrupt
from fedsim.lock import FolderBusy, clear, hold
from fedsim.report.claims import check_claims
from fedsim.report.report import write_report
from fedsim.report.run_folder import Damaged, read_run
from fedsim.report.tables import sweep_tables
from fedsim.report.tuning import tuning_result
from fedsim.run import preflight, resolve, resume, run
from fedsim.server.dp import start_lines
from fedsim.sinks import Tracking
from fedsim.sinks.mlflow import end_sweep_parent, sweep_parent

SWEEP_JSON = "sweep.json"


@dataclass(frozen=True)
class SweepResult:
    path: Path
    report: Path
    ran: list[str]
    skipped: list[str]
    seconds: float


def _check_finished(cell: Cell, folder: Path) -> None:
    """A finished cell must have been run with this cell's scenario (where its folder lies,
    ``output.dir``, may differ: a sweep folder can be moved). One that cannot be read
    (:func:`fedsim.report.run_folder.read_run`) is damaged, not different: it is not run
    again, and the report lists it and leaves it out."""
    files = read_run(folder)
    if files is not None and not isinstance(files, Damaged):
        _check_same(cell, folder, files.scenario)


def _check_same(cell: Cell, folder: Path, stored: Scenario) -> None:
    """``folder`` ran ``stored``: refuse it unless that is ``cell``'s scenario."""
    a, b = flat_keys(stored.to_dict()), flat_keys(cell.scenario.to_dict())
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k != "output.dir")
    if not diff:
        return
    raise ScenarioError(
        f"sweep cell {folder} was run with a different scenario (differs in "
        f"{', '.join(diff[:5])}); use --out DIR for a new sweep or --overwrite to re-run it"
    )


def _interrupted(folder: Path, scenario: Scenario) -> bool:
    """True when ``folder`` holds an unfinished run of ``scenario`` with a checkpoint."""
    if not (folder / "scenario.toml").is_file() or (folder / "summary.json").exists():
        return False
    if not any((folder / n).is_file() for n in ("checkpoint.pt", "checkpoint.prev.pt")):
        return False
    try:
        stored = load_scenario(folder / "scenario.toml")
        _check_same(Cell(folder.name, {}, scenario), folder, stored)
    except (ScenarioError, OSError, UnicodeDecodeError):
        return False
    return True


def _run_cell(raw: dict, out: str, threads: int | None, name: str = "",
              may_stop: bool = False,
              tracking: Tracking | None = None) -> tuple[dict, float, str]:
    """Run one cell (also in a worker process), resuming an interrupted one from its last
    checkpoint; returns its summary, wall seconds and a note (why it did not resume, or why
    it stopped early). ``may_stop``: a run that stops early (diverged, too few replies)
    returns the summary it wrote instead of raising (tuning cells). ``tracking``: how the
    cell's trackers join the sweep's (its MLflow parent, W&B group).

    The process holds the cell folder's lock throughout (:mod:`fedsim.lock`), from before it
    looks for a checkpoint until the cell's summary is written; a failure to write names the
    cell (``ResultsNotWritten.cell``)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    scenario = scenario_from_dict(raw)
    note = ""
    try:
        sweep = os.getppid() if multiprocessing.parent_process() else os.getpid()
        with hold(out, f"a cell of the fedsim sweep in pid {sweep}"):
            if _interrupted(Path(out), scenario):
                try:
                    return resume(out, tracking=tracking).summary, time.perf_counter() - t0, ""
                except (CheckpointError, ScenarioError) as exc:
                    if isinstance(exc, RunStopped):
                        raise
                    note = f"could not resume ({exc}); ran it from the start"
            result = run(scenario, out=out, overwrite=True, tracking=tracking)
    except RunStopped as exc:
        summary = Path(out) / "summary.json"
        if not may_stop or not summary.is_file():
            raise
        return json.loads(summary.read_text()), time.perf_counter() - t0, f"stopped: {exc}"
    except ResultsNotWritten as exc:
        exc.cell = name or Path(out).name
        raise
    except EngineFailed as exc:  # the sweep's line names the cell and resumes the sweep
        raise EngineFailed(f"sweep cell {name or Path(out).name}: {exc}", exc.folder) from None
    except FolderBusy as exc:
        raise FolderBusy(f"sweep cell {name or Path(out).name}: {exc}") from None
    return result.summary, time.perf_counter() - t0, note


def _worker_init() -> None:
    """A sweep worker ignores Ctrl-C (the terminal sends it to every process of the group):
    the sweep process decides, and stops the cells it runs with SIGTERM.

    The worker started with SIGINT blocked (see :func:`_sigint_blocked`), so a Ctrl-C that
    arrived while it was still importing is pending; ignoring it first, then unblocking,
    discards it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def _sigint_blocked():
    """SIGINT blocked in this thread for the block: the worker processes started inside it
    inherit the blocked signal through exec, so a Ctrl-C before their initializer runs (while
    they import torch) cannot raise KeyboardInterrupt there and print a traceback. Here it is
    only deferred: it is delivered when the block ends (as multiprocessing's resource tracker
    is started)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _run_cell_in_worker(raw: dict, out: str, threads: int | None, name: str,
                        may_stop: bool = False,
                        tracking: Tracking | None = None) -> tuple[dict, float, str]:
    """:func:`_run_cell` where SIGTERM raises Interrupted, so the cell unwinds cleanly (its
    state store closes; its checkpoints stay) and the worker takes the next message."""
    with signals_interrupt((signal.SIGTERM,)):
        return _run_cell(raw, out, threads, name, may_stop, tracking)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)  # even with --quiet


def _sweep_tracking(base: Scenario, root: Path) -> Tracking | None:
    """How the cells' trackers join the sweep: one W&B group and one MLflow experiment named
    after it, and with ``mlflow`` an MLflow parent run the cells are children of (None when
    the sweep names no tracker). A parent that cannot be made costs the sweep nothing: the
    cells log as runs of their own, and the line says so."""
    sinks = set(base.output.sinks)
    if not sinks & {"mlflow", "wandb"}:
        return None
    tracking = Tracking(group=base.name, experiment=base.name)
    if "mlflow" in sinks:
        try:
            tracking = sweep_parent(base, root)
        except ResultsNotWritten:  # the sweep folder's own trackers.json: a failed write
            raise
        except Exception as exc:  # a tracker never takes the sweep down
            _warn(f"the sweep's MLflow parent run could not be made ({type(exc).__name__}: "
                  f"{exc}); its cells log as runs of their own")
    return tracking


def _end_tracking(tracking: Tracking | None, root: Path) -> None:
    """Attach the sweep's report and tables to its MLflow parent run and end it (a sweep
    that stops before this leaves the parent running; resumed, it continues the same one)."""
    if tracking is None or not tracking.mlflow_parent:
        return
    try:
        end_sweep_parent(tracking, root)
    except Exception as exc:  # a tracker never takes the sweep down
        _warn(f"the sweep's MLflow parent run could not be ended ({type(exc).__name__}: {exc})")


def _stop_workers(futures: dict[Future, Cell], grace: float = 30.0) -> None:
    """Cancel the cells not started and SIGTERM the worker processes until every cell has
    ended (a worker may pick up one more queued cell before it sees the stop)."""
    for future in futures:
        future.cancel()
    deadline = time.monotonic() + grace
    while not all(f.done() for f in futures) and time.monotonic() < deadline:
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
        wait(list(futures), timeout=0.1)
    for child in multiprocessing.active_children():  # past the grace period
        child.kill()


def _progress(scenario: Scenario | str | Path, overrides: Sequence[str],
              out: str | Path | None) -> tuple[str, Path] | None:
    """Which cells of a stopped sweep (tuning cells included) are done, where the unfinished
    ones stopped, and how many never started; with the sweep folder (None: the sweep cannot
    be read)."""
    try:
        base = resolve(scenario, overrides)
        root = Path(out or base.output.dir)
        points = grid_points(base)  # names only: building 10,000 cells takes minutes
        cells = [*tune_points(base, points), *points]
    except (ScenarioError, OSError):
        return None
    done, partial, fresh = 0, [], 0
    for name, _params in cells:
        folder = root / name
        if (folder / "summary.json").is_file():
            done += 1
        elif (folder / "scenario.toml").is_file():
            k = checkpoint_round(folder)
            total = _rounds_of(folder, base.server.rounds)
            partial.append(f"{name} at round {k} of {total}" if k is not None
                           else f"{name} before its first checkpoint")
        else:
            fresh += 1
    parts = [f"{done} of {len(cells)} cells done"]
    if partial:
        shown = ", ".join(partial[:3]) + (f" and {len(partial) - 3} more" if len(partial) > 3
                                          else "")
        parts.append(f"stopped: {shown}")
    if fresh:
        parts.append(f"{fresh} not started")
    return "; ".join(parts), root


def _rounds_of(folder: Path, default: int) -> int:
    """``server.rounds`` of the run in ``folder`` as its ``scenario.toml`` says (``default``
    where it cannot be read): read as TOML only, no scenario is built."""
    try:
        rounds = tomllib.loads((folder / "scenario.toml").read_text(encoding="utf-8"))[
            "server"]["rounds"]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError):
        return default
    return rounds if isinstance(rounds, int) and not isinstance(rounds, bool) else default


def _resume_command(argv: Sequence[str]) -> str:
    """The sweep's own command without ``--overwrite``: finished cells are skipped,
    interrupted ones resume from their checkpoints."""
    return command(["fedsim", *(a for a in argv if a != "--overwrite")])


def interrupted_line(scenario: Scenario | str | Path, overrides: Sequence[str] = (),
                     out: str | Path | None = None,
                     argv: Sequence[str] = ()) -> str:
    """The one line an interrupted ``fedsim sweep`` ends with: which cells are done, where
    the unfinished ones stopped, and the command that resumes the sweep."""
    progress = _progress(scenario, overrides, out)
    if progress is None:
        return ("interrupted before the sweep started; start it again with: "
                f"{_resume_command(argv)}")
    parts, root = progress
    return f"interrupted: {parts} (in {root}); resume with: {_resume_command(argv)}"


def not_written_tail(scenario: Scenario | str | Path, overrides: Sequence[str] = (),
                     out: str | Path | None = None, argv: Sequence[str] = ()) -> str:
    """What a sweep that could not write its results (a cell's or its own) kept, and the
    command that resumes it once they can be written: the end of its ``error:`` line."""
    progress = _progress(scenario, overrides, out)
    if progress is None:
        return f"nothing kept; then start it again with: {_resume_command(argv)}"
    parts, root = progress
    return f"kept: {parts} (in {root}); then resume with: {_resume_command(argv)}"


def _describe(summary: dict) -> str:
    parts = []
    acc = (summary.get("final") or {}).get("global_test_accuracy")
    if acc is not None:
        parts.append(f"acc {acc:.3f}")
    for name, m in ((summary.get("privacy") or {}).get("mia") or {}).items():
        parts.append(f"{name} AUC {m['auc']:.3f}")
    return ", ".join(parts)


class _Runner:
    """Runs cells in this process (one worker) or in one pool of worker processes, kept
    for every phase of a sweep; counts them for the progress lines."""

    def __init__(self, root: Path, workers: int, total: int, finished: int,
                 say: Callable[[str], None]) -> None:
        self.root, self.workers, self.total, self.say = root, workers, total, say
        self.done = self.finished_before = finished
        self.pool: ProcessPoolExecutor | None = None
        self.seconds: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def _report(self, cell: Cell, summary: dict, secs: float, note: str) -> None:
        self.done += 1
        self.seconds[cell.name] = secs
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / (self.done - self.finished_before) * (self.total - self.done)
        how = ""
        if summary.get("resumed_from"):
            how = f", resumed after round {summary['resumed_from'][-1]}"
        elif note:
            how = f"; {note}"
        width = len(str(self.total))
        self.say(f"[{self.done:>{width}}/{self.total}] {cell.name}: {secs:.1f} s "
                 f"({_describe(summary)}{how}); elapsed {elapsed / 60:.1f} min, "
                 f"ETA {eta / 60:.1f} min")

    def run(self, todo: Sequence[Cell], may_stop: bool = False,
            tracking: Tracking | None = None) -> None:
        """Run ``todo`` to the end (``may_stop``: early stops are results, not errors;
        ``tracking``: how the cells' trackers join the sweep's)."""
        if self.pool is None and (self.workers <= 1 or len(todo) <= 1):
            for cell in todo:
                self._report(cell, *_run_cell(cell.scenario.to_dict(),
                                              str(self.root / cell.name), None, cell.name,
                                              may_stop, tracking))
            return
        if self.pool is None:
            ctx = get_context("spawn")  # fresh interpreters: no forked torch/thread state
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx,
                                            initializer=_worker_init)
        futures: dict[Future, Cell] = {}
        try:
            with _sigint_blocked():  # submit starts the worker processes
                for c in todo:
                    futures[self.pool.submit(_run_cell_in_worker, c.scenario.to_dict(),
                                             str(self.root / c.name), 1, c.name,
                                             may_stop, tracking)] = c
            for future in as_completed(futures):
                self._report(futures[future], *future.result())
        except (Interrupted, ResultsNotWritten, FolderBusy, EngineFailed):  # the others keep
            _stop_workers(futures)  # their checkpoints; the sweep's line names the cell
            raise


def _split_finished(cells: Sequence[Cell], root: Path) -> tuple[list[Cell], list[str]]:
    """(cells to run, names of those finished earlier: checked to match their scenario)."""
    todo, skipped = [], []
    for cell in cells:
        folder = root / cell.name
        if (folder / "summary.json").is_file():
            _check_finished(cell, folder)
            skipped.append(cell.name)
        else:
            todo.append(cell)
    return todo, skipped


def _invocations(root: Path, warn: Callable[[str], None]) -> list:
    """The invocations an earlier ``sweep.json`` in ``root`` records (none when there is
    none; a file that cannot be read loses only that history, and says so)."""
    path = root / SWEEP_JSON
    if not path.is_file():
        return []
    try:
        runs = json.loads(path.read_text(encoding="utf-8")).get("invocations", [])
    except (OSError, ValueError, AttributeError) as exc:
        warn(f"{path} cannot be read ({type(exc).__name__}: {exc}); it is rewritten without "
             "the earlier invocations")
        return []
    return runs if isinstance(runs, list) else []


def _covering(tuning: list[TuneCell]) -> list[TuneCell]:
    """The tuning cells to preflight: each arm at every grid value on the first tuning seed,
    and at every tuning seed with the first grid value — every value and every seed's data
    checked once, without building arms × values × seeds models (the reported cells are all
    preflighted)."""
    if not tuning:
        return []
    seed, values = tuning[0].seed, tuning[0].values
    return [c for c in tuning if c.seed == seed or c.values == values]


def preflight_cells(cells: Sequence[Cell], say: Callable[[str], None]) -> None:
    """Preflight every cell (data, model, engine: :func:`fedsim.run.preflight`) before any
    runs, saying each distinct DP warning once and, on long checks, how far they got. The
    vectorize trace check, a dry cohort step that costs more than the rest of a cell's
    preflight, runs once per distinct model (:func:`fedsim.engine.vectorized.trace_key`):
    cells that differ in seed, partition or learning rate share its outcome, a failing one
    included."""
    said: set[str] = set()
    traced: dict[tuple, str | None] = {}
    ticker = Ticker("checking cells", len(cells), say)
    for i, cell in enumerate(cells, 1):
        preflight(cell.scenario, traced)
        for line in start_lines(cell.scenario):
            if line not in said:
                said.add(line)
                say(f"{cell.name}: {line}")
        ticker.tick(i)


def _chosen(base: Scenario, root: Path, tuning: list[TuneCell], cells: list[Cell],
            say: Callable[[str], None], warn: Callable[[str], None]) -> dict:
    """The tuning result once every tuning cell is done; a ScenarioError for an arm with no
    value to choose (before any reported cell runs)."""
    result = tuning_result(root, base.sweep.tune, [c.record() for c in tuning],
                           followers(base, cells), warn)
    for entry in result["arms"]:
        if entry["chosen"] is None:
            problems = "; ".join(p for c in entry["candidates"] for p in c["problems"])
            raise ScenarioError(
                f"sweep.tune: no value of {base.sweep.tune.grid} finished on every tuning seed "
                f"for arm {entry['label']} ({problems}); change the grid (e.g. smaller "
                "learning rates) and run the sweep again")
        chosen = ", ".join(f"{k} = {v}" for k, v in entry["chosen"]["applied"].items())
        how = (f"follows {entry['follows']}" if entry.get("follows") else
               f"mean {base.sweep.tune.metric} {entry['chosen']['mean']:.4f}")
        say(f"tuned {entry['label']}: {chosen} ({how})")
    return result


def run_sweep(
    scenario: Scenario | str | Path,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    yes: bool = False,
) -> SweepResult:
    """Run (or resume) the sweep of ``scenario`` and write ``report.md``; see the module doc.

    Every cell is validated (including its data and model), the ``[[claims]]`` against the
    grid and ``[sweep.tune]`` against the scenario, before any cell runs; a sweep of more
    than :data:`fedsim.cells.LARGE_SWEEP` cells runs only with ``yes`` (``--yes``), and while
    cells are built and checked a progress line is said every
    :data:`fedsim.cells.CHECK_PROGRESS_SECONDS` s.
    """
    say = progress or (lambda _msg: None)
    # a damaged cell is said even without progress lines (``--quiet``)
    warn = (lambda msg: progress(f"warning: {msg}")) if progress else _warn
    base = resolve(scenario, overrides)
    check_size(base, yes)
    root = Path(out or base.output.dir)
    cells = expand(base, root, say)
    check_claims(base, cells)
    tuning = tune_cells(base, root, cells) if base.sweep.tune.enabled else []
    preflight_cells([*_covering(tuning), *cells], say)
    if root.exists() and not root.is_dir():
        raise ScenarioError(f"sweep folder {str(root)!r} exists and is not a folder")
    with hold(root, "fedsim sweep"):  # before anything in it is read, removed or written
        return _run_cells(root, base, cells, tuning, workers or base.sweep.workers, overwrite,
                          say, warn)


def _run_cells(root: Path, base: Scenario, cells: list[Cell], tuning: list[TuneCell],
               workers: int, overwrite: bool, say: Callable[[str], None],
               warn: Callable[[str], None]) -> SweepResult:
    """The tuning and reported cells of a checked sweep not finished yet, then its report
    (the caller holds the sweep folder's lock); ``warn`` hears of each damaged cell."""
    if overwrite:
        clear(root, "fedsim sweep --overwrite")  # a cell another process writes is refused
    make_folder(root)
    tune_todo, skipped = _split_finished(tuning, root)
    reported_done = [c for c in cells if (root / c.name / "summary.json").is_file()]
    write_text(root / "scenario.toml", tomli_w.dumps(base.to_dict()))
    n = len(tuning) + len(cells)
    finished = len(skipped) + len(reported_done)
    say(f"sweep {base.name}: {n} cells" + (f" ({len(tuning)} tuning)" if tuning else "")
        + f", {finished} finished earlier, {n - finished} to run → {root}")
    tracking = _sweep_tracking(base, root)
    load_start = os.getloadavg()
    tuned = None
    with _Runner(root, workers, n, finished, say) as runner:
        runner.run(tune_todo, may_stop=True)  # no trackers (see _untracked)
        if tuning:
            tuned = _chosen(base, root, tuning, cells, say, warn)
            cells = with_choices(cells, tuned["arms"])
        todo, done = _split_finished(cells, root)
        skipped += done
        runner.run(todo, tracking=tracking)
    ran = [*tune_todo, *todo]
    wall = time.perf_counter() - runner.t0
    runs = _invocations(root, warn)
    if ran:
        runs.append({"ran": [c.name for c in ran], "cell_seconds": runner.seconds,
                     "wall_seconds": wall, "workers": workers, "cpus": os.cpu_count(),
                     "load_average": {"start": load_start, "end": os.getloadavg()}})
    info = {
        "scenario": base.name,
        "axes": base.sweep.grid,
        "cells": [{"name": c.name, "params": c.params} for c in cells],
        "invocations": runs,  # every invocation that ran cells, with its wall time and load
    }
    if tuning:
        info["tuning"] = {"cells": [c.record() for c in tuning]}
    write_json(root / SWEEP_JSON, info, indent=2, default=str)
    report = write_report(root, base, cells, run_info=runs[-1] if runs else None,
                          tuning=tuned, warn=warn)
    say(f"report → {report}")
    formats = ["csv", *(["parquet"] if "parquet" in base.output.sinks else [])]
    for fmt in formats:  # cells.csv, claims.csv: one row per (cell, round), per claim
        sweep_tables(root, [(c.name, c.params) for c in cells], list(base.sweep.grid), fmt,
                     note=lambda msg: say(f"note: {msg}"))
    _end_tracking(tracking, root)
    return SweepResult(root, report, [c.name for c in ran], skipped, wall)
