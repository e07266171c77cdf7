"""``fedsim table``: tidy tables of finished run and sweep folders, for pandas and friends.

- A run folder: ``rounds.csv`` (or ``.parquet``), one row per round of its ``rounds.jsonl``,
  flattened as the run writes it (:mod:`fedsim.sinks.tables`).
- A sweep folder: ``cells.csv``, one row per (cell, round) of its finished cells, with a
  ``cell`` column and one column per sweep axis (named by the axis key, e.g.
  ``model.norm``; list values as JSON text) before the round's columns; and
  ``claims.csv``, one row per claim of ``report.json`` (arms as ``a.<axis>``/``b.<axis>``,
  per-setting results and pairs as JSON text).

Cells are read as every reader of results folders reads them
(:func:`fedsim.report.run_folder.read_run`): an unfinished or damaged cell is skipped with a
one-line note saying why (for a damaged one, which file and what is wrong with it).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from fedsim.errors import ScenarioError
from fedsim.report.run_folder import Damaged, read_run
from fedsim.sinks.flat import flatten
from fedsim.sinks.tables import FORMATS, round_rows, write_table

CLAIM_COLUMNS = ("name", "verdict", "metric", "metric_b", "at", "expect", "diff_mean",
                 "ci_low", "ci_high", "ci_level", "p_value", "p_holm", "n_pairs",
                 "seeds_needed")


class UnreadableCell(Exception):
    """A sweep cell whose records cannot be read (the message says why)."""


def read_rounds(path: Path) -> list[dict]:
    """The records of an unfinished run's ``rounds.jsonl``; a torn last line (a run killed
    mid-write) is left out."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break  # a run killed mid-write: the complete lines stand
            raise
    return records


def read_cell(folder: Path) -> list[dict]:
    """The round records of a finished sweep cell (:func:`fedsim.report.run_folder.read_run`);
    UnreadableCell says why not."""
    files = read_run(folder)
    if files is None:
        raise UnreadableCell("not finished (no summary.json)")
    if isinstance(files, Damaged):
        raise UnreadableCell(f"damaged: {files}")
    return files.rounds


def _axis_value(value):
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def cell_rows(root: Path, cells: Sequence[tuple[str, dict]], axes: Sequence[str],
              note: Callable[[str], None]) -> list[dict]:
    """One flat row per (finished cell, round) of the sweep in ``root``: ``cells`` are
    (name, axis values) pairs, each cell in ``root / name``."""
    rows = []
    for name, params in cells:
        try:
            records = read_cell(root / name)
        except UnreadableCell as exc:
            note(f"cell {name} skipped: {exc}")
            continue
        fixed = {"cell": name, **{k: _axis_value(params.get(k)) for k in axes}}
        rows += [{**fixed, **row} for row in round_rows(records)]
    return rows


def claim_rows(root: Path) -> list[dict] | None:
    """One flat row per claim of the sweep's ``report.json`` (None when it has none);
    UnreadableCell when the file is not a report's JSON."""
    path = root / "report.json"
    if not path.is_file():
        return None
    try:
        claims = json.loads(path.read_text(encoding="utf-8")).get("claims") or []
        return [flatten(c) for c in claims]
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise UnreadableCell(f"{path} cannot be read ({type(exc).__name__}: {exc})") from None


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ScenarioError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "parquet" and importlib.util.find_spec("pyarrow") is None:
        raise ScenarioError("--format parquet needs the pyarrow package: pip install "
                            "'fedsim[tables]' (or use --format csv)")


def sweep_tables(root: Path, cells: Sequence[tuple[str, dict]], axes: Sequence[str],
                 fmt: str = "csv", out: Path | None = None,
                 note: Callable[[str], None] = lambda msg: None) -> list[Path]:
    """Write the sweep's ``cells`` and ``claims`` tables; returns their paths."""
    check_format(fmt)
    rows = cell_rows(root, cells, axes, note)
    path = Path(out) if out else root / f"cells.{fmt}"
    written = [write_table(rows, path, fmt, first=("cell", *axes, "round"))]
    try:
        claims = claim_rows(root)
        if claims is None:
            note(f"no claims table: {root / 'report.json'} is missing (fedsim report {root})")
    except UnreadableCell as exc:
        claims = None
        note(f"no claims table: {exc}; rebuild it with: fedsim report {root}")
    if claims is not None:
        path = path.with_name(f"{path.stem}_claims{path.suffix}") if out else \
            root / f"claims.{fmt}"
        written.append(write_table(claims, path, fmt, first=CLAIM_COLUMNS))
    return written


def run_table(folder: Path, fmt: str = "csv", out: Path | None = None,
              note: Callable[[str], None] = lambda msg: None) -> Path:
    """Write the run's ``rounds`` table; returns its path. A finished run is read as every
    reader reads it (:func:`fedsim.report.run_folder.read_run`: a damaged one is refused,
    naming the file and why); an unfinished one up to its last complete line."""
    check_format(fmt)
    files = read_run(folder)
    if isinstance(files, Damaged):
        raise ScenarioError(f"{str(folder)!r} is damaged, {files}; run it again to redo it")
    if files is not None:
        records = files.rounds
    else:
        note(f"{folder} has not finished (no summary.json): the table holds its rounds so far")
        try:
            records = read_rounds(folder / "rounds.jsonl")
        except (OSError, ValueError) as exc:
            raise ScenarioError(f"{folder / 'rounds.jsonl'} cannot be read ({exc})") from None
    path = Path(out) if out else folder / f"rounds.{fmt}"
    return write_table(round_rows(records), path, fmt, first=("round",))
