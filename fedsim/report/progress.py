"""Live progress for ``fedsim run``: rounds, clients, loss, accuracy, updates/s and ETA."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextlib.contextmanager
def round_progress(total_rounds: int, label: str) -> Iterator:
    """Yield an ``on_round(record)`` callback that advances a one-line progress bar on stderr."""
    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    updates = [0, 0.0]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=total_rounds, stats="starting")

        def on_round(rec: dict) -> None:
            updates[0] += rec.get("updates", 0)
            updates[1] += rec.get("train_seconds", 0.0)
            parts = []
            if rec.get("round", 0) >= 1:
                parts.append(f"clients {rec.get('updates', 0)}")
                if rec.get("failures"):
                    parts.append(f"failed {len(rec['failures'])}")
            if rec.get("train_loss") is not None:
                parts.append(f"loss {rec['train_loss']:.3f}")
            if rec.get("global_test_accuracy") is not None:
                parts.append(f"acc {rec['global_test_accuracy']:.3f}")
            if updates[1] > 0:
                parts.append(f"{updates[0] / updates[1]:.1f} upd/s")
            # completed = the round number, so a resumed run's bar starts where it stopped
            bar.update(task, completed=rec.get("round", 0), stats="  ".join(parts))

        yield on_round
