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
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import tomli_w

from fedsim.config import Scenario, apply_override, load_scenario, scenario_from_dict
from fedsim.errors import CheckpointError, ScenarioError
from fedsim.interrupt import Interrupted, checkpoint_round, command, signals_interrupt
from fedsim.report.claims import check_claims
from fedsim.report.report import write_report
from fedsim.run import check, preflight, resolve, resume, run
from fedsim.server.dp import start_lines

SWEEP_JSON = "sweep.json"


@dataclass(frozen=True)
class Cell:
    """One grid point: its folder name, axis values and fully resolved scenario."""

    name: str
    params: dict[str, Any]
    scenario: Scenario


@dataclass(frozen=True)
class SweepResult:
    path: Path
    report: Path
    ran: list[str]
    skipped: list[str]
    seconds: float


def toml_literal(value: Any) -> str:
    """``value`` as a TOML literal, for ``apply_override``."""
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def _label(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(_label(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return re.sub(r"[^A-Za-z0-9.+-]", "_", str(value))


def cell_name(params: dict[str, Any]) -> str:
    """Folder name of a cell: ``short-key-value`` parts joined by ``__`` (full keys where
    two axes share a last component)."""
    shorts = [k.rsplit(".", 1)[-1] for k in params]
    parts = []
    for key, short in zip(params, shorts):
        label = short if shorts.count(short) == 1 else key
        parts.append(f"{label}-{_label(params[key])}")
    return "__".join(parts) or "base"


def grid_points(base: Scenario) -> list[tuple[str, dict[str, Any]]]:
    """(folder name, axis values) of every cell of ``base``'s grid, the last axis varying
    fastest: cheap (no scenario is built), for what needs only the names."""
    grid = base.sweep.grid
    if not grid:
        raise ScenarioError("the scenario has no [sweep] grid; add e.g. "
                            "[sweep] model.norm = [\"bn\", \"gn\"] and seed = [0, 1, 2]")
    keys = list(grid)
    points = []
    for values in itertools.product(*(grid[k] for k in keys)):
        params = dict(zip(keys, values))
        points.append((cell_name(params), params))
    names = [name for name, _ in points]
    if len(set(names)) != len(names):
        raise ScenarioError("two sweep cells get the same folder name; make the axis values "
                            "distinct")
    return points


def expand(base: Scenario, root: Path, say: Callable[[str], None] | None = None
           ) -> list[Cell]:
    """Every cell of ``base``'s grid (the last axis varies fastest), each validated; ``say``
    hears how far it got every :data:`CHECK_PROGRESS_SECONDS` s."""
    points = grid_points(base)
    plain = base.to_dict()
    plain["sweep"] = {}
    plain["claims"] = []  # claims belong to the sweep, not to a cell
    cells = []
    t0 = last = time.monotonic()
    for i, (name, params) in enumerate(points, 1):
        raw = copy.deepcopy(plain)
        for key, value in params.items():
            try:
                apply_override(raw, f"{key}={toml_literal(value)}")
            except ScenarioError as exc:
                raise ScenarioError(f"sweep axis {key!r}: {exc}") from None
        raw["name"] = f"{base.name}/{name}"
        raw.setdefault("output", {})["dir"] = str(root / name)
        try:
            scenario = check(scenario_from_dict(raw))
        except ScenarioError as exc:
            raise ScenarioError(f"sweep cell {name}: {exc}") from None
        cells.append(Cell(name, params, scenario))
        if say is not None and time.monotonic() - last >= CHECK_PROGRESS_SECONDS \
                and i < len(points):
            last = time.monotonic()
            say(f"building cells: {i} of {len(points)} ({last - t0:.0f} s, about "
                f"{(last - t0) / i * (len(points) - i):.0f} s left)")
    return cells


#: cells above which a sweep runs only when asked twice (``--yes``): checking one cell
#: builds its data and model (~0.1–1 s), and running one takes seconds to hours, so 1,000
#: cells check for minutes and run for days; an axis typed as ``seed = [0, ..., 9999]``
#: instead of ``[0, ..., 9]`` should say so before either
LARGE_SWEEP = 1000
#: seconds between the progress lines said while cells are checked
CHECK_PROGRESS_SECONDS = 5.0


def grid_size(base: Scenario) -> int:
    """The number of cells of ``base``'s grid (the product of its axes' lengths)."""
    return math.prod(len(v) for v in base.sweep.grid.values())


def check_size(base: Scenario, yes: bool) -> None:
    """Refuse a grid of more than :data:`LARGE_SWEEP` cells unless ``yes``, before any cell
    is expanded or checked."""
    n = grid_size(base)
    if n > LARGE_SWEEP and not yes:
        axes = " × ".join(f"{k} ({len(v):,})" for k, v in base.sweep.grid.items())
        raise ScenarioError(
            f"the sweep has {n:,} cells ({axes}), more than {LARGE_SWEEP:,}: checking them "
            "takes minutes and running them may take days; pass --yes to run it anyway, or "
            "shrink the grid")


def flat_keys(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested scenario dict as dotted keys (``{"model": {"norm": "bn"}}`` → ``model.norm``)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(flat_keys(v, key) if isinstance(v, dict) else {key: v})
    return out


def _check_finished(cell: Cell, folder: Path) -> None:
    """A finished cell must have been run with this cell's scenario (where its folder lies,
    ``output.dir``, may differ: a sweep folder can be moved). One whose ``scenario.toml`` no
    longer parses is damaged, not different: the report lists it
    (:mod:`fedsim.report.run_folder`)."""
    try:
        stored = load_scenario(folder / "scenario.toml")
    except (ScenarioError, OSError, UnicodeDecodeError):
        return
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
        _check_finished(Cell(folder.name, {}, scenario), folder)
    except (ScenarioError, OSError):
        return False
    return True


def _run_cell(raw: dict, out: str, threads: int | None) -> tuple[dict, float, str]:
    """Run one cell (also in a worker process), resuming an interrupted one from its last
    checkpoint; returns its summary, wall seconds and why it did not resume (or "")."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    scenario = scenario_from_dict(raw)
    not_resumed = ""
    if _interrupted(Path(out), scenario):
        try:
            return resume(out).summary, time.perf_counter() - t0, ""
        except (CheckpointError, ScenarioError) as exc:  # unusable: start the cell again
            not_resumed = f"could not resume ({exc}); ran it from the start"
    result = run(scenario, out=out, overwrite=True)
    return result.summary, time.perf_counter() - t0, not_resumed


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


def _run_cell_in_worker(raw: dict, out: str, threads: int | None) -> tuple[dict, float, str]:
    """:func:`_run_cell` where SIGTERM raises Interrupted, so the cell unwinds cleanly (its
    state store closes; its checkpoints stay) and the worker takes the next message."""
    with signals_interrupt((signal.SIGTERM,)):
        return _run_cell(raw, out, threads)


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


def interrupted_line(scenario: Scenario | str | Path, overrides: Sequence[str] = (),
                     out: str | Path | None = None,
                     argv: Sequence[str] = ()) -> str:
    """The one line an interrupted ``fedsim sweep`` ends with: which cells are done, where
    the unfinished ones stopped, and the command that resumes the sweep (the same command,
    without ``--overwrite``: finished cells are skipped, interrupted ones resume from their
    checkpoints)."""
    resume = ["fedsim", *(a for a in argv if a != "--overwrite")]
    try:
        base = resolve(scenario, overrides)
        root = Path(out or base.output.dir)
        cells = grid_points(base)  # names only: building 10,000 cells takes minutes
    except (ScenarioError, OSError):
        return f"interrupted before the sweep started; start it again with: {command(resume)}"
    done, partial, fresh = 0, [], 0
    for name, params in cells:
        folder = root / name
        if (folder / "summary.json").is_file():
            done += 1
        elif (folder / "scenario.toml").is_file():
            k = checkpoint_round(folder)
            total = params.get("server.rounds", base.server.rounds)
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
    return (f"interrupted: {'; '.join(parts)} (in {root}); resume with: {command(resume)}")


def _describe(summary: dict) -> str:
    parts = []
    acc = (summary.get("final") or {}).get("global_test_accuracy")
    if acc is not None:
        parts.append(f"acc {acc:.3f}")
    for name, m in ((summary.get("privacy") or {}).get("mia") or {}).items():
        parts.append(f"{name} AUC {m['auc']:.3f}")
    return ", ".join(parts)


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

    Every cell is validated (including its data and model), and the ``[[claims]]`` against
    the grid, before any cell runs; a grid of more than :data:`LARGE_SWEEP` cells runs only
    with ``yes`` (``--yes``), and while cells are checked a progress line is said every
    :data:`CHECK_PROGRESS_SECONDS` s.
    """
    say = progress or (lambda _msg: None)
    base = resolve(scenario, overrides)
    check_size(base, yes)
    root = Path(out or base.output.dir)
    cells = expand(base, root, say)
    check_claims(base, cells)
    said: set[str] = set()
    t0 = last = time.monotonic()
    for i, cell in enumerate(cells, 1):
        preflight(cell.scenario)
        for line in start_lines(cell.scenario):  # a DP warning once per distinct message
            if line not in said:
                said.add(line)
                say(f"{cell.name}: {line}")
        if time.monotonic() - last >= CHECK_PROGRESS_SECONDS and i < len(cells):
            last = time.monotonic()
            left = (last - t0) / i * (len(cells) - i)
            say(f"checking cells: {i} of {len(cells)} ({last - t0:.0f} s, about {left:.0f} s "
                "left)")
    if root.exists() and not root.is_dir():
        raise ScenarioError(f"sweep folder {str(root)!r} exists and is not a folder")
    if overwrite and root.is_dir():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    todo, skipped = [], []
    for cell in cells:
        folder = root / cell.name
        if (folder / "summary.json").is_file():
            _check_finished(cell, folder)
            skipped.append(cell.name)
        else:
            todo.append(cell)
    (root / "scenario.toml").write_text(tomli_w.dumps(base.to_dict()))
    n = len(cells)
    say(f"sweep {base.name}: {n} cells, {len(skipped)} finished earlier, {len(todo)} to run "
        f"→ {root}")
    workers = workers or base.sweep.workers
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    seconds: dict[str, float] = {}
    done = len(skipped)

    def report_cell(cell: Cell, summary: dict, secs: float, not_resumed: str) -> None:
        nonlocal done
        done += 1
        seconds[cell.name] = secs
        elapsed = time.perf_counter() - t0
        eta = elapsed / (done - len(skipped)) * (n - done)
        how = ""
        if summary.get("resumed_from"):
            how = f", resumed after round {summary['resumed_from'][-1]}"
        elif not_resumed:
            how = f"; {not_resumed}"
        say(f"[{done:>{len(str(n))}}/{n}] {cell.name}: {secs:.1f} s ({_describe(summary)}"
            f"{how}); elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min")

    if workers <= 1 or len(todo) <= 1:
        for cell in todo:
            report_cell(cell, *_run_cell(cell.scenario.to_dict(), str(root / cell.name), None))
    else:
        ctx = get_context("spawn")  # fresh interpreters: no forked torch/thread state
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                 initializer=_worker_init) as pool:
            futures: dict[Future, Cell] = {}
            try:
                with _sigint_blocked():  # submit starts the worker processes
                    for c in todo:
                        futures[pool.submit(_run_cell_in_worker, c.scenario.to_dict(),
                                            str(root / c.name), 1)] = c
                for future in as_completed(futures):
                    report_cell(futures[future], *future.result())
            except Interrupted:
                _stop_workers(futures)
                raise
    wall = time.perf_counter() - t0
    previous = {}
    if (root / SWEEP_JSON).is_file():
        previous = json.loads((root / SWEEP_JSON).read_text())
    runs = previous.get("invocations", [])
    if todo:
        runs.append({"ran": [c.name for c in todo], "cell_seconds": seconds,
                     "wall_seconds": wall, "workers": workers, "cpus": os.cpu_count(),
                     "load_average": {"start": load_start, "end": os.getloadavg()}})
    info = {
        "scenario": base.name,
        "axes": base.sweep.grid,
        "cells": [{"name": c.name, "params": c.params} for c in cells],
        "invocations": runs,  # every invocation that ran cells, with its wall time and load
    }
    (root / SWEEP_JSON).write_text(json.dumps(info, indent=2, default=str) + "\n")
    report = write_report(root, base, cells, run_info=runs[-1] if runs else None, warn=say)
    say(f"report → {report}")
    return SweepResult(root, report, [c.name for c in todo], skipped, wall)
