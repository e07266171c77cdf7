"""``fedsim report``: rebuild a sweep's report, or compare finished runs in one report.

A sweep folder's report is rebuilt from the cells on disk (nothing is trained; unfinished
cells are counted as missing). Run folders from separate ``fedsim run`` invocations are
compared like sweep cells: what varies between them (their scenario keys that differ,
execution and output settings aside) plays the sweep's axes, so the same tables and plots
come out (claims are declared by a sweep, so a comparison of runs has none).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.cells import followers
from fedsim.config import load_written_scenario
from fedsim.errors import ScenarioError
from fedsim.files import write_json
from fedsim.lock import clear, hold, is_empty
from fedsim.report.report import write_report
from fedsim.report.tables import run_table, sweep_tables
from fedsim.report.tuning import tuning_result
from fedsim.sweep import SWEEP_JSON, flat_keys

#: scenario keys that say how or where a run executed, not what it learned
_NOT_AXES = ("name", "output.", "engine.", "sweep.", "claims")


@dataclass(frozen=True)
class RunCell:
    """A finished run folder taking part in a comparison, as a sweep cell."""

    name: str
    params: dict[str, Any]
    path: Path


def is_sweep(folder: Path) -> bool:
    return (folder / SWEEP_JSON).is_file()


def report_sweep(root: Path, warn: Callable[[str], None] | None = None) -> Path:
    """Rebuild ``report.md``/``report.json``/plots of the sweep in ``root`` from its cells
    (holding the sweep folder's lock: a sweep still running there is not raced); each
    damaged cell (left out, listed in the report) is told to ``warn``."""
    with hold(root, "fedsim report", create=False):
        return _report_sweep(root, warn)


def _report_sweep(root: Path, warn: Callable[[str], None] | None) -> Path:
    try:
        info = json.loads((root / SWEEP_JSON).read_text())
        names = [(c["name"], c["params"]) for c in info["cells"]]
    except (ValueError, KeyError, TypeError):
        names = None
    if names is None or not (root / "scenario.toml").is_file():
        raise ScenarioError(f"{str(root)!r} has a {SWEEP_JSON} but is not a sweep folder "
                            "written by fedsim sweep (no cell list, or no scenario.toml); "
                            "run the sweep again: fedsim sweep FILE --out DIR")
    base = load_written_scenario(root / "scenario.toml")
    cells = [RunCell(name, params, root / name) for name, params in names]
    runs = info.get("invocations") or []
    tuning = None
    if base.sweep.tune.enabled and isinstance(info.get("tuning"), dict):
        tuning = tuning_result(root, base.sweep.tune, info["tuning"].get("cells") or [],
                               followers(base, cells), warn)
    return write_report(root, base, cells, run_info=runs[-1] if runs else None, tuning=tuning,
                        warn=warn)


def check_report_folder(folders: list[Path], out: Path) -> None:
    """``out`` may take a comparison of ``folders``: it is none of them, lies in none of
    them and holds none of them (--overwrite would replace a run)."""
    target = out.resolve()
    for folder in folders:
        run = folder.resolve()
        if target == run or run in target.parents or target in run.parents:
            where = ("is" if target == run else "lies inside" if run in target.parents
                     else "holds")
            raise ScenarioError(
                f"--out {str(out)!r} {where} the compared run folder {str(folder)!r}; a "
                "report never writes into a run it compares: pass another --out DIR")


def report_runs(folders: list[Path], out: Path, overwrite: bool = False,
                warn: Callable[[str], None] | None = None) -> Path:
    """Compare finished run folders in one report written to ``out`` (a new or empty folder,
    or any folder but a compared run's with ``overwrite``), holding its lock; a folder whose
    files cannot be read is left out, listed and told to ``warn``
    (:mod:`fedsim.report.run_folder`)."""
    check_report_folder(folders, out)
    cells, axes = _compared(folders)  # every check before anything is written
    with hold(out, "fedsim report"):
        if not is_empty(out):
            if not overwrite:
                raise ScenarioError(
                    f"--out {str(out)!r} is not empty; pass --overwrite to replace what it "
                    "holds, or another --out DIR")
            clear(out, "fedsim report --overwrite")
        write_json(out / "runs.json",
                   [{"name": c.name, "path": str(c.path.resolve()), "params": c.params}
                    for c in cells], indent=2, default=str)
        return write_report(out, None, cells, axes=axes, title="Comparison of runs",
                            warn=warn)


def _compared(folders: list[Path]) -> tuple[list[RunCell], dict[str, list]]:
    """The finished runs ``folders`` as cells, and the axes their scenarios vary along."""
    for folder in folders:
        if not (folder / "summary.json").is_file() or not (folder / "scenario.toml").is_file():
            hint = (f"finish it with: fedsim run --resume {folder}"
                    if (folder / "checkpoint.pt").is_file() else
                    "pass folders written by fedsim run (summary.json, scenario.toml)")
            raise ScenarioError(f"{str(folder)!r} is not a finished run folder; {hint}")
    flats = [_flat_scenario(f) for f in folders]  # {} where scenario.toml does not parse
    keys = sorted({k for flat in flats for k in flat})
    read = [flat for flat in flats if flat]
    varying = [k for k in keys if not k.startswith(_NOT_AXES)
               and len({json.dumps(flat.get(k), sort_keys=True) for flat in read}) > 1]
    cells = [RunCell(name, {k: flat.get(k) for k in varying}, folder)
             for name, flat, folder in zip(_unique_names(folders), flats, folders)]
    axes: dict[str, list] = {k: [] for k in varying}
    for cell, flat in zip(cells, flats):
        for k, v in (cell.params.items() if flat else ()):  # a damaged run adds no value
            if v not in axes[k]:
                axes[k].append(v)
    return cells, axes


def _flat_scenario(folder: Path) -> dict[str, Any]:
    """The run's scenario as dotted keys; {} when its ``scenario.toml`` does not parse (the
    report then lists the run as damaged)."""
    try:
        return flat_keys(load_written_scenario(folder / "scenario.toml").to_dict())
    except (ScenarioError, OSError, UnicodeDecodeError):
        return {}


def _unique_names(folders: list[Path]) -> list[str]:
    """Folder names, with parent folders prepended until they are distinct."""
    for depth in range(1, max(len(f.resolve().parts) for f in folders) + 1):
        names = ["/".join(f.resolve().parts[-depth:]) for f in folders]
        if len(set(names)) == len(names):
            return names
    raise ScenarioError("the same run folder is given twice; pass each run once")


def report(folders: list[str | Path], out: str | Path | None = None,
           overwrite: bool = False, warn: Callable[[str], None] | None = None) -> Path:
    """``fedsim report``: one sweep folder (report rebuilt in place) or run folders
    (compared in ``out``, replacing what it holds only with ``overwrite``). Bad input is a
    ScenarioError naming the fix; each damaged cell or run folder (left out, listed in the
    report) is told to ``warn``."""
    paths = [Path(f) for f in folders]
    for p in paths:
        if not p.is_dir():
            raise ScenarioError(f"{str(p)!r} is not a folder; pass sweep or run folders")
    sweeps = [p for p in paths if is_sweep(p)]
    if sweeps:
        if len(paths) > 1 or out is not None:
            raise ScenarioError(
                f"{str(sweeps[0])!r} is a sweep folder: its report is rebuilt in place; pass it "
                "alone and without --out (to compare its cells with other runs, pass the "
                "cell folders instead)")
        return report_sweep(paths[0], warn)
    if out is None:
        raise ScenarioError("comparing run folders needs --out DIR for the report")
    return report_runs(paths, Path(out), overwrite, warn)


def tables(folder: str | Path, fmt: str = "csv", out: str | Path | None = None,
           note: Callable[[str], None] = lambda msg: None) -> list[Path]:
    """``fedsim table``: rebuild a run folder's rounds table, or a sweep folder's cells and
    claims tables (:mod:`fedsim.report.tables`), from the folders on disk."""
    folder = Path(folder)
    out = Path(out) if out else None
    if is_sweep(folder):
        info = json.loads((folder / SWEEP_JSON).read_text())
        cells = [(c["name"], c["params"]) for c in info["cells"]]
        with _writing_into(folder, out):
            return sweep_tables(folder, cells, list(info.get("axes") or {}), fmt, out, note)
    if (folder / "rounds.jsonl").is_file():
        with _writing_into(folder, out):
            return [run_table(folder, fmt, out, note)]
    raise ScenarioError(f"{str(folder)!r} is neither a run folder (rounds.jsonl) nor a sweep "
                        f"folder ({SWEEP_JSON}); pass a folder written by fedsim run or "
                        "fedsim sweep")


def _writing_into(folder: Path, out: Path | None) -> contextlib.AbstractContextManager:
    """The folder's lock while ``fedsim table`` writes its tables into it (no ``--out``): a
    run or sweep still writing there is not raced."""
    return hold(folder, "fedsim table", create=False) if out is None else contextlib.nullcontext()
