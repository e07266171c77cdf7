"""Tidy tables of round records: ``rounds.csv`` (always) and ``rounds.parquet``.

One row per round, the record flattened by :func:`fedsim.sinks.flat.flatten` (dotted
columns; lists and per-client maps as JSON text). Missing and null values are empty cells.
Floats are written with Python's ``repr`` (shortest round-trip form), so a CSV cell reads
back to exactly the JSON number; Parquet columns are typed (bool, int64, float64, string).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fedsim.files import atomic_write, write_text
from fedsim.sinks.base import SINKS, RunEnd, Sink
from fedsim.sinks.flat import flatten

FORMATS = ("csv", "parquet")


def columns(rows: Iterable[dict], first: Sequence[str] = ()) -> list[str]:
    """Every column of ``rows``: ``first`` (those present) in order, then the rest sorted;
    no rows at all: ``first`` (an empty table keeps its header)."""
    seen: set[str] = set()
    for row in rows:
        seen.update(row)
    if not seen:
        return list(first)
    return [c for c in first if c in seen] + sorted(seen - set(first))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def csv_text(rows: Sequence[dict], first: Sequence[str] = ()) -> str:
    """The rows as CSV text (header first)."""
    cols = columns(rows, first)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in cols])
    return buf.getvalue()


def _arrow_type(values: list, pa):
    """One Arrow type per column: bool, int64, float64 (ints and floats mixed) or string."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.int64()
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       for v in present):
        return pa.float64()
    return pa.string()


def arrow_table(rows: Sequence[dict], first: Sequence[str] = ()):
    """The rows as a ``pyarrow.Table`` (needs pyarrow: ``fedsim[tables]``)."""
    import pyarrow as pa  # optional: only parquet tables need it

    arrays, names = [], []
    for col in columns(rows, first):
        values = [row.get(col) for row in rows]
        kind = _arrow_type(values, pa)
        if kind == pa.float64():
            values = [float(v) if v is not None else None for v in values]
        elif kind == pa.string():
            values = [_cell(v) if v is not None else None for v in values]
        arrays.append(pa.array(values, type=kind))
        names.append(col)
    return pa.Table.from_arrays(arrays, names=names)


def write_table(rows: Sequence[dict], path: str | Path, fmt: str,
                first: Sequence[str] = ()) -> Path:
    """Write flat ``rows`` to ``path`` as ``csv`` or ``parquet``, atomically."""
    if fmt == "csv":
        return write_text(path, csv_text(rows, first))
    import pyarrow.parquet as pq  # optional: only parquet tables need it

    table = arrow_table(rows, first)
    return atomic_write(path, lambda fh: pq.write_table(table, fh))


def round_rows(records: Iterable[dict]) -> list[dict]:
    """``rounds.jsonl`` records as flat rows."""
    return [flatten(r) for r in records]


@SINKS.register("csv")
class CsvTable(Sink):
    """``rounds.csv`` in the run folder: every run writes it (``fedsim table`` rebuilds it)."""

    name = "csv"
    fmt = "csv"
    writes_folder = True

    def end(self, result: RunEnd) -> None:
        write_table(round_rows(result.rounds), result.folder / f"rounds.{self.fmt}",
                    self.fmt, first=("round",))


@SINKS.register("parquet")
class ParquetTable(CsvTable):
    """``rounds.parquet`` in the run folder, typed columns (needs ``fedsim[tables]``)."""

    name = "parquet"
    fmt = "parquet"
    requires = ("pyarrow",)
    extra = "tables"
