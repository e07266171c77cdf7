"""Live progress for ``fedsim run`` (and a deployed run, whose records are read from its
``rounds.jsonl``): one updating line with rounds, clients/s, loss, accuracy and ETA, as
informative at 10,000 clients as at 10."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedsim.text import one_line


@contextlib.contextmanager
def round_progress(total_rounds: int, label: str, population: int | None = None) -> Iterator:
    """Yield an ``on_round(record)`` callback that advances a one-line progress bar on stderr.

    ``population`` (``partition.num_clients``), when given, is shown beside each round's
    clients ("100 of 1,000,000 clients"), so a large federation's line says how large it is.
    """
    console = Console(stderr=True)
    label = escape(one_line(label))  # a name is data: no Rich markup, no control characters
    columns = (  # most important first: a narrow terminal cuts the line from the right
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
    )
    updates = [0, 0.0]
    seen: set[int] = set()  # distinct clients that trained so far
    last_acc: list[float] = []
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=total_rounds, stats="starting")

        def on_round(rec: dict) -> None:
            updates[0] += rec.get("updates", 0)
            updates[1] += rec.get("train_seconds", 0.0)
            seen.update(rec.get("clients") or ())
            if rec.get("global_test_accuracy") is not None:
                last_acc[:] = [rec["global_test_accuracy"]]
            # completed = the round number, so a resumed run's bar starts where it stopped
            bar.update(task, completed=rec.get("round", 0),
                       stats=round_stats(rec, updates[0], updates[1], len(seen), last_acc,
                                             population))

        yield on_round


def round_stats(rec: dict, updates: int, train_seconds: float, distinct: int,
                last_acc: list[float], population: int | None = None) -> str:
    """One short line: clients this round (of the ``population``, when given), updates so
    far, clients/s, loss, accuracy.

    Its length does not grow with the federation (10,000 clients print like 10, the
    population as one number), and the accuracy of the last evaluated round stays shown
    between evaluations.
    """
    parts = []
    if rec.get("round", 0) >= 1:
        part = f"{rec.get('updates', 0)} clients"
        if population is not None:
            part = f"{rec.get('updates', 0)} of {population:,} clients"
        if rec.get("failures"):
            part += f" ({len(rec['failures'])} failed)"
        parts.append(part)
        parts.append(f"{updates:,} updates by {distinct:,} clients")
    if rec.get("train_loss") is not None:
        parts.append(f"loss {rec['train_loss']:.3f}")
    if last_acc:
        parts.append(f"acc {last_acc[0]:.3f}")
    if train_seconds > 0:
        parts.append(f"{updates / train_seconds:.1f} clients/s")
    return "  ".join(parts)


class RoundsFollower:
    """Reads the records a run appends to ``rounds.jsonl`` in another process (a deployed
    ServerApp), for the same progress line as the in-process engines.

    A file already there when the follower is made belongs to an earlier run and is skipped
    until it is rewritten; a file that shrinks (rewritten, or truncated by a resume) is read
    again from its start. Only complete lines are returned.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stale = self._identity()
        self._offset = 0

    def _identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def poll(self) -> list[dict]:
        """The records appended since the last call."""
        identity = self._identity()
        if identity is None or identity == self._stale:
            return []
        self._stale = None
        if identity[2] < self._offset:
            self._offset = 0
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        records = []
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records
