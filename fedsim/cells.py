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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedsim.config import (
    MAX_CELLS_ENV,
    Scenario,
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


def expand(base: Scenario, root: Path) -> list[Cell]:
    """Every cell of ``base``'s grid (the last axis varies fastest), each validated; with
    tuning, as the base scenario sets the tuned keys (:func:`with_choices` applies them).
    Only the first ``FEDSIM_MAX_CELLS`` when that is set (README "Testing")."""
    grid = base.sweep.grid
    if not grid:
        raise ScenarioError("the scenario has no [sweep] grid; add e.g. "
                            "[sweep] model.norm = [\"bn\", \"gn\"] and seed = [0, 1, 2]")
    keys = list(grid)
    cells = []
    combos = itertools.product(*(grid[k] for k in keys))
    for values in itertools.islice(combos, env_limit(MAX_CELLS_ENV)):
        params = dict(zip(keys, values))
        name = cell_name(params)
        scenario = _finish(_cell_raw(base, params), base, name, root / name)
        cells.append(Cell(name, params, scenario))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ScenarioError("two sweep cells get the same folder name; make the axis values "
                            "distinct")
    return cells


# --------------------------------------------------------------------------- tuning


def arm_of(params: dict[str, Any]) -> dict[str, Any]:
    """A cell's arm: its axis values but the seed."""
    return {k: v for k, v in params.items() if k != SEED}


def arms(cells: list[Cell]) -> list[dict[str, Any]]:
    """The distinct arms of ``cells``, in cell order."""
    out: list[dict[str, Any]] = []
    for cell in cells:
        if (arm := arm_of(cell.params)) not in out:
            out.append(arm)
    return out


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
    keys = list(tune.grid)
    out = []
    for arm in arms(cells):
        if base.sweep.leader(arm) is not None:  # takes another arm's choice (tune.follow)
            continue
        for combo in itertools.product(*(tune.grid[k] for k in keys)):
            values = dict(zip(keys, combo))
            for seed in tune.seeds:
                raw = _cell_raw(base, arm)
                # a tracker's run per tuning cell would bury the study's runs: tuning cells
                # keep their folder's tables and report to no tracker
                raw["output"]["sinks"] = list(folder_sinks(base.output.sinks))
                _set(raw, SEED, seed, "sweep.tune.seeds")
                applied = scaled(tune, values, scenario_from_dict(raw))
                for key, value in applied.items():
                    _set(raw, key, value, f"sweep.tune.grid.{key}")
                params = {**arm, **values, SEED: seed}
                name = f"{TUNE_DIR}/{cell_name(params)}"
                scenario = _finish(raw, base, name, root / name, "sweep.tune cell")
                out.append(TuneCell(name, params, scenario, arm=arm, values=values,
                                    applied=applied, seed=seed))
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
