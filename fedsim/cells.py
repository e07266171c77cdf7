"""A sweep's cells: the grid expanded into scenarios, tuning cells, chosen values applied.

Each cell is an ordinary scenario with its own folder under the sweep folder, named after
its axis values (``norm-bn__batch_size-4__seed-0``). A zipped axis (``[sweep.zip.<axis>]``)
sets several keys per value. With ``[sweep.tune]``, each **arm** — a combination of the
axes other than seed — first runs every grid value on every tuning seed
(``tune/<arm>__lr-0.1__seed-100``); the reported cells then run at the values chosen for
their arm (:func:`fedsim.report.tuning.tuning_result`), applied by :func:`with_choices`; an
arm that follows another (``sweep.tune.follow``) runs no tuning cells and takes its choice.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedsim.config import (
    MAX_CELLS_ENV,
    Scenario,
    SweepConfig,
    TuneConfig,
    apply_override,
    env_limit,
    scenario_from_dict,
)
from fedsim.errors import ScenarioError
from fedsim.run import check
from fedsim.sinks import folder_sinks

SEED = "seed"
TUNE_DIR = "tune"


@dataclass(frozen=True)
class Cell:
    """One grid point: its folder name, axis values and fully resolved scenario."""

    name: str
    params: dict[str, Any]
    scenario: Scenario


@dataclass(frozen=True)
class TuneCell(Cell):
    """A tuning cell: its arm (axis values, seed excluded), grid values (as in the grid),
    the values its scenario runs with (``applied``: scaled where ``sweep.tune.scale`` says)
    and its tuning seed."""

    arm: dict[str, Any] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    applied: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def record(self) -> dict[str, Any]:
        """What ``sweep.json`` keeps of it, for rebuilding the tuning table."""
        return {"name": self.name, "arm": self.arm, "values": self.values,
                "applied": self.applied, "seed": self.seed}


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


def flat_keys(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested scenario dict as dotted keys (``{"model": {"norm": "bn"}}`` → ``model.norm``)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(flat_keys(v, key) if isinstance(v, dict) else {key: v})
    return out


def _set(raw: dict, key: str, value: Any, where: str) -> None:
    try:
        apply_override(raw, f"{key}={toml_literal(value)}")
    except ScenarioError as exc:
        raise ScenarioError(f"{where}: {exc}") from None


def _set_axes(base: Scenario, raw: dict, params: dict[str, Any]) -> None:
    """Apply a cell's axis values to ``raw``; a zipped axis sets each of its keys."""
    for key, value in params.items():
        zipped = base.sweep.zipped(key, value)
        if zipped is None:
            _set(raw, key, value, f"sweep axis {key!r}")
        else:
            for k, v in zipped.items():
                _set(raw, k, v, f"sweep.zip.{key}.{value}")


def _cell_raw(base: Scenario, params: dict[str, Any]) -> dict:
    raw = base.to_dict()
    raw["sweep"] = {}
    raw["claims"] = []  # claims belong to the sweep, not to a cell
    _set_axes(base, raw, params)
    return raw


def _finish(raw: dict, base: Scenario, name: str, folder: Path,
            what: str = "sweep cell") -> Scenario:
    raw["name"] = f"{base.name}/{name}"
    raw.setdefault("output", {})["dir"] = str(folder)
    try:
        return check(scenario_from_dict(raw))
    except ScenarioError as exc:
        raise ScenarioError(f"{what} {name}: {exc}") from None


#: cells above which a sweep runs only when asked twice (``--yes``): checking one cell
#: builds its data and model (~0.1–1 s), and running one takes seconds to hours, so 1,000
#: cells check for minutes and run for days; an axis typed as ``seed = [0, ..., 9999]``
#: instead of ``[0, ..., 9]`` should say so before either
LARGE_SWEEP = 1000
#: seconds between the progress lines said while cells are built and checked
CHECK_PROGRESS_SECONDS = 5.0


class Ticker:
    """Says ``<what>: i of n (elapsed, about .. left)`` at most every
    :data:`CHECK_PROGRESS_SECONDS` s while a long loop over cells runs (never after the last
    one), so building or checking 10,000 cells is not minutes of silence."""

    def __init__(self, what: str, total: int, say: Callable[[str], None] | None) -> None:
        self.what, self.total, self.say = what, total, say
        self.t0 = self.last = time.monotonic()

    def tick(self, i: int) -> None:
        """Cell ``i`` (counted from 1) is done."""
        now = time.monotonic()
        if self.say is None or now - self.last < CHECK_PROGRESS_SECONDS or i >= self.total:
            return
        self.last = now
        left = (now - self.t0) / i * (self.total - i)
        self.say(f"{self.what}: {i} of {self.total} ({now - self.t0:.0f} s, about {left:.0f} s "
                 "left)")


def grid_points(base: Scenario) -> list[tuple[str, dict[str, Any]]]:
    """(folder name, axis values) of every cell of ``base``'s grid, the last axis varying
    fastest: cheap (no scenario is built), for what needs only the names. Only the first
    ``FEDSIM_MAX_CELLS`` when that is set (README "Testing")."""
    grid = base.sweep.grid
    if not grid:
        raise ScenarioError("the scenario has no [sweep] grid; add e.g. "
                            "[sweep] model.norm = [\"bn\", \"gn\"] and seed = [0, 1, 2]")
    keys = list(grid)
    combos = itertools.product(*(grid[k] for k in keys))
    points = []
    for values in itertools.islice(combos, env_limit(MAX_CELLS_ENV)):
        params = dict(zip(keys, values))
        points.append((cell_name(params), params))
    if len({name for name, _ in points}) != len(points):
        raise ScenarioError("two sweep cells get the same folder name; make the axis values "
                            "distinct")
    return points


def expand(base: Scenario, root: Path, say: Callable[[str], None] | None = None
           ) -> list[Cell]:
    """Every cell of ``base``'s grid (:func:`grid_points`), each validated; with tuning, as
    the base scenario sets the tuned keys (:func:`with_choices` applies them). ``say`` hears
    how far it got every :data:`CHECK_PROGRESS_SECONDS` s."""
    points = grid_points(base)
    ticker = Ticker("building cells", len(points), say)
    cells = []
    for i, (name, params) in enumerate(points, 1):
        scenario = _finish(_cell_raw(base, params), base, name, root / name)
        cells.append(Cell(name, params, scenario))
        ticker.tick(i)
    return cells


def sweep_size(base: Scenario) -> tuple[int, int]:
    """(reported cells, tuning cells) of ``base``'s sweep, counted without building one."""
    grid = base.sweep.grid
    n = math.prod(len(v) for v in grid.values())
    cap = env_limit(MAX_CELLS_ENV)
    tune = base.sweep.tune
    if not tune.enabled:
        return (n if cap is None else min(n, cap)), 0
    if cap is None:
        n_arms = n // max(1, len(grid.get(SEED, [base.seed])))
    else:
        n = min(n, cap)
        n_arms = len(_arms(p for _, p in grid_points(base)))
    return n, n_arms * math.prod(len(v) for v in tune.grid.values()) * len(tune.seeds)


def check_size(base: Scenario, yes: bool) -> None:
    """Refuse a sweep of more than :data:`LARGE_SWEEP` cells (tuning cells included) unless
    ``yes``, before any cell is built or checked."""
    n, tuning = sweep_size(base)
    if n + tuning > LARGE_SWEEP and not yes:
        axes = " × ".join(f"{k} ({len(v):,})" for k, v in base.sweep.grid.items())
        extra = f" and {tuning:,} tuning cells" if tuning else ""
        raise ScenarioError(
            f"the sweep has {n:,} cells ({axes}){extra}, more than {LARGE_SWEEP:,}: checking "
            "them takes minutes and running them may take days; pass --yes to run it anyway, "
            "or shrink the grid")


# --------------------------------------------------------------------------- tuning


def arm_of(params: dict[str, Any]) -> dict[str, Any]:
    """A cell's arm: its axis values but the seed."""
    return {k: v for k, v in params.items() if k != SEED}


def arms(cells: list[Cell]) -> list[dict[str, Any]]:
    """The distinct arms of ``cells``, in cell order."""
    return _arms(cell.params for cell in cells)


def _arms(params: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in params:
        if (arm := arm_of(p)) not in out:
            out.append(arm)
    return out


def _tune_grid(sweep: SweepConfig, arm_list: Sequence[dict[str, Any]]
               ) -> Iterator[tuple[dict[str, Any], dict[str, Any], int, str]]:
    """(arm, grid values, tuning seed, folder name) of every tuning cell, in run order; an
    arm that takes another arm's choice (``sweep.tune.follow``) has none."""
    tune = sweep.tune
    keys = list(tune.grid)
    for arm in arm_list:
        if sweep.leader(arm) is not None:
            continue
        for combo in itertools.product(*(tune.grid[k] for k in keys)):
            values = dict(zip(keys, combo))
            for seed in tune.seeds:
                yield arm, values, seed, f"{TUNE_DIR}/{cell_name({**arm, **values, SEED: seed})}"


def tune_points(base: Scenario, points: Sequence[tuple[str, dict[str, Any]]]
                ) -> list[tuple[str, dict[str, Any]]]:
    """(folder name, values) of every tuning cell of the grid ``points``
    (:func:`grid_points`), none built: for what needs only the names."""
    if not base.sweep.tune.enabled:
        return []
    return [(name, {**arm, **values, SEED: seed}) for arm, values, seed, name
            in _tune_grid(base.sweep, _arms(p for _, p in points))]


def reported_seeds(base: Scenario) -> list[int]:
    """The seeds the sweep reports: its seed axis, else the scenario's seed."""
    return list(base.sweep.grid.get(SEED, [base.seed]))


def scaled(tune: TuneConfig, values: dict[str, Any], scenario: Scenario) -> dict[str, Any]:
    """The values a cell runs with: each grid value times its ``sweep.tune.scale`` key's
    value in ``scenario`` (unscaled keys as they are)."""
    flat = flat_keys(scenario.to_dict())
    out = {}
    for key, value in values.items():
        by = tune.scale.get(key)
        if by is None:
            out[key] = value
            continue
        factor = flat.get(by)
        if by not in flat or isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise ScenarioError(
                f"sweep.tune.scale.{key} = {by!r} is not a numeric scenario key (e.g. "
                "\"client.batch_size\")")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ScenarioError(f"sweep.tune.grid.{key}: {value!r} cannot be scaled by {by}; "
                                "scaled values must be numbers")
        out[key] = value * factor
    return out


def tune_cells(base: Scenario, root: Path, cells: list[Cell]) -> list[TuneCell]:
    """Every arm × grid value × tuning seed, under ``root/tune/``, reporting to no tracker
    (``output.sinks`` keeps the folder's tables only); refuses (before anything
    runs) a grid key not in the scenario, a value it rejects, a tuning seed that is also a
    reported seed, and cells without a validation split to select on."""
    tune = base.sweep.tune
    overlap = sorted(set(tune.seeds) & set(reported_seeds(base)))
    if overlap:
        where = "sweep.seed" if SEED in base.sweep.grid else "seed"
        raise ScenarioError(
            f"sweep.tune.seeds {list(tune.seeds)} share {overlap} with the reported seeds "
            f"({where} = {reported_seeds(base)}); tuning seeds must be others, so the "
            "reported runs are fresh draws")
    for cell in cells:
        if cell.scenario.data.validation_fraction <= 0:
            raise ScenarioError(
                f"sweep.tune selects on the validation split, but sweep cell {cell.name} "
                "holds none out (data.validation_fraction = 0); set "
                "data.validation_fraction = 0.1 (a tenth of the training pool, the same for "
                "every cell)")
    out = []
    for arm, values, seed, name in _tune_grid(base.sweep, arms(cells)):
        raw = _cell_raw(base, arm)
        # a tracker's run per tuning cell would bury the study's runs: tuning cells keep
        # their folder's tables and report to no tracker
        raw["output"]["sinks"] = list(folder_sinks(base.output.sinks))
        _set(raw, SEED, seed, "sweep.tune.seeds")
        applied = scaled(tune, values, scenario_from_dict(raw))
        for key, value in applied.items():
            _set(raw, key, value, f"sweep.tune.grid.{key}")
        scenario = _finish(raw, base, name, root / name, "sweep.tune cell")
        out.append(TuneCell(name, {**arm, **values, SEED: seed}, scenario, arm=arm,
                            values=values, applied=applied, seed=seed))
    if len({c.name for c in out}) != len(out):
        raise ScenarioError("two tuning cells get the same folder name; make the "
                            "sweep.tune.grid values distinct")
    return out


def followers(base: Scenario, cells: list[Cell]) -> list[tuple[dict, dict]]:
    """(arm, the arm whose tuned values it takes) for each arm of ``cells`` that follows
    another (``sweep.tune.follow``)."""
    return [(arm, lead) for arm in arms(cells) if (lead := base.sweep.leader(arm)) is not None]


def with_choices(cells: list[Cell], arms: list[dict]) -> list[Cell]:
    """``cells`` at the values chosen for their arm (``arms``: the ``arms`` of
    :func:`fedsim.report.tuning.tuning_result`, each ``arm`` and ``chosen.applied``)."""
    out = []
    for cell in cells:
        arm = arm_of(cell.params)
        pick = next(a["chosen"] for a in arms if a["arm"] == arm)
        raw = cell.scenario.to_dict()
        for key, value in pick["applied"].items():
            _set(raw, key, value, f"sweep.tune.grid.{key}")
        out.append(Cell(cell.name, cell.params, check(scenario_from_dict(raw))))
    return out
