"""``fedsim report``: rebuild a sweep's report, or compare finished runs in one report.

A sweep folder's report is rebuilt from the cells on disk (nothing is trained; unfinished
cells are counted as missing). Run folders from separate ``fedsim run`` invocations are
compared like sweep cells: what varies between them (their scenario keys that differ,
execution and output settings aside) plays the sweep's axes, so the same tables and plots
come out (claims are declared by a sweep, so a comparison of runs has none).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.config import load_scenario
from fedsim.errors import ScenarioError
from fedsim.report.report import write_report
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
    """Rebuild ``report.md``/``report.json``/plots of the sweep in ``root`` from its cells."""
    try:
        info = json.loads((root / SWEEP_JSON).read_text())
        names = [(c["name"], c["params"]) for c in info["cells"]]
    except (ValueError, KeyError, TypeError):
        names = None
    if names is None or not (root / "scenario.toml").is_file():
        raise ScenarioError(f"{str(root)!r} has a {SWEEP_JSON} but is not a sweep folder "
                            "written by fedsim sweep (no cell list, or no scenario.toml); "
                            "run the sweep again: fedsim sweep FILE --out DIR")
    base = load_scenario(root / "scenario.toml")
    cells = [RunCell(name, params, root / name) for name, params in names]
    runs = info.get("invocations") or []
    return write_report(root, base, cells, run_info=runs[-1] if runs else None, warn=warn)


def report_runs(folders: list[Path], out: Path,
                warn: Callable[[str], None] | None = None) -> Path:
    """Compare finished run folders in one report written to ``out``; a folder whose files
    cannot be read is left out and listed (:mod:`fedsim.report.run_folder`)."""
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
    for cell in cells:
        for k, v in cell.params.items():
            if v not in axes[k]:
                axes[k].append(v)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.json").write_text(json.dumps(
        [{"name": c.name, "path": str(c.path.resolve()), "params": c.params} for c in cells],
        indent=2, default=str) + "\n")
    return write_report(out, None, cells, axes=axes, title="Comparison of runs", warn=warn)


def _flat_scenario(folder: Path) -> dict[str, Any]:
    """The run's scenario as dotted keys; {} when its ``scenario.toml`` does not parse (the
    report then lists the run as damaged)."""
    try:
        return flat_keys(load_scenario(folder / "scenario.toml").to_dict())
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
           warn: Callable[[str], None] | None = None) -> Path:
    """``fedsim report``: one sweep folder (report rebuilt in place) or run folders
    (compared in ``out``). Bad input is a ScenarioError naming the fix; each damaged cell or
    run folder (left out, listed in the report) is told to ``warn``."""
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
    return report_runs(paths, Path(out), warn)
