"""Live progress for ``fedsim run`` (and a deployed run, whose records are read from its
``rounds.jsonl``): rounds, clients/s, loss, accuracy and ETA, as informative at 10,000
clients as at 10.

On a terminal it is one updating line (rich), cut from the right at the terminal's edge so
the run, round and times stay. Anywhere else — a log file, a pipe, a batch job's output —
it prints plain lines instead, each one complete (round, elapsed time, ETA, clients, loss,
accuracy), because carriage-return updates are lost or garbled there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import Progress, ProgressColumn
from rich.table import Column
from rich.text import Text

from fedsim.config import Scenario
from fedsim.sinks.base import RunEnd, RunStart, Sink
from fedsim.text import one_line


def _clock(seconds: float) -> str:
    """``H:MM:SS``."""
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _LineColumn(ProgressColumn):
    """The whole line as one rich column, rendered at each refresh (the clock ticks between
    rounds) and cut at the right edge of a narrow terminal, so what comes first — the run,
    the round, the times — is what stays."""

    def __init__(self, text: Callable[[], str]) -> None:
        super().__init__(table_column=Column(no_wrap=True, overflow="ellipsis"))
        self.text = text

    def render(self, task) -> Text:
        return Text(self.text(), no_wrap=True, overflow="ellipsis")


class ProgressLine(Sink):
    """The progress display as a sink: an updating line on a terminal, plain lines elsewhere.

    Both read ``<run>: round r/N  elapsed H:MM:SS  ETA H:MM:SS  <the round's stats>``; the
    ETA is the time per round trained so far (by this run, or this resumed part) times the
    rounds left. On a terminal a bar leads the line, which is redrawn in place and cut at
    the terminal's edge from the right.

    Parameters
    ----------
    stream:
        Where it writes (default: stderr, read when the run starts).
    min_interval:
        Plain lines: at most one every this many seconds (the first round and the last are
        always printed), so a log of a 5,000-round run stays readable.
    terminal:
        Force the mode (default: whether ``stream`` is a terminal).
    """

    name = "progress"
    BAR = 12  # characters of the terminal bar

    def __init__(self, stream: TextIO | None = None, min_interval: float = 1.0,
                 terminal: bool | None = None) -> None:
        self.stream = stream
        self.min_interval = min_interval
        self.terminal = terminal
        self._live: Progress | None = None

    def start(self, run: RunStart) -> None:
        scenario = run.scenario
        self.out = self.stream if self.stream is not None else sys.stderr
        if self.terminal is None:
            self.terminal = bool(getattr(self.out, "isatty", lambda: False)())
        self.total = scenario.server.rounds
        # a name is data: no control characters (the terminal line is a rich Text, never
        # parsed as markup, so "[bold]" prints as itself there too)
        self.label = one_line(scenario.name) + (
            " (resumed)" if run.resumed_round is not None else "")
        self.population = scenario.partition.num_clients
        # the first record this run (part) writes: round 0 (the initial model) when fresh
        self.first = run.resumed_round + 1 if run.resumed_round is not None else 0
        self.first_trained = (run.resumed_round or 0) + 1
        self.updates, self.train_seconds = 0, 0.0
        self.seen: set[int] = set()  # distinct clients that trained so far
        self.last_acc: list[float] = []
        self.t0 = self.t_round = time.monotonic()
        self.round = run.resumed_round or 0
        self.stats = "starting"
        self._printed = -math.inf  # when the last plain line was printed
        self._pending: str | None = None  # a plain line held back by min_interval
        if self.terminal:
            console = Console(file=self.out, force_terminal=True)
            self._live = Progress(_LineColumn(self.terminal_line), console=console)
            self._live.start()
            self._live.add_task(self.label, total=self.total)

    def on_round(self, rec: dict) -> None:
        self.updates += rec.get("updates", 0)
        self.train_seconds += rec.get("train_seconds", 0.0)
        self.seen.update(rec.get("clients") or ())
        if rec.get("global_test_accuracy") is not None:
            self.last_acc[:] = [rec["global_test_accuracy"]]
        self.round = rec.get("round", 0)
        self.t_round = time.monotonic()
        self.stats = round_stats(rec, self.updates, self.train_seconds, len(self.seen),
                                 self.last_acc, self.population)
        if self._live is not None:
            self._live.refresh()
            return
        line = self.line()
        if (self.round in (self.first, self.total)
                or self.t_round - self._printed >= self.min_interval):
            self._print(line)
            self._printed = self.t_round
        else:
            self._pending = line

    def line(self) -> str:
        """``<run>: round r/N  elapsed ..  ETA ..  <stats>`` as of now."""
        now = time.monotonic()
        done = self.round - self.first_trained + 1  # rounds trained since this part started
        eta = "?"
        if done > 0:
            per_round = (self.t_round - self.t0) / done
            eta = _clock(per_round * (self.total - self.round) - (now - self.t_round))
        parts = [f"{self.label}: round {self.round}/{self.total}",
                 f"elapsed {_clock(now - self.t0)}", f"ETA {eta}", self.stats]
        return "  ".join(p for p in parts if p)

    def terminal_line(self) -> str:
        filled = round(self.BAR * min(self.round, self.total) / max(self.total, 1))
        return "█" * filled + "░" * (self.BAR - filled) + " " + self.line()

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)
        self._pending = None

    def end(self, result: RunEnd) -> None:
        self.close()
        stopped = result.summary.get("stopped")
        if stopped:
            print(f"{self.label}: stopped after round {stopped.get('round')}: "
                  f"{one_line(stopped.get('reason'))}", file=self.out, flush=True)

    def error(self, exc: BaseException) -> None:
        self.close()

    def close(self) -> None:
        """Stop the updating line (terminal) or print the line held back (plain)."""
        if self._live is not None:
            self._live.stop()
            self._live = None
        elif self._pending is not None:
            self._print(self._pending)


@contextlib.contextmanager
def round_progress(scenario: Scenario, folder: str | Path) -> Iterator[Callable[[dict], None]]:
    """The progress line of a run whose records come from elsewhere (a deployed run's
    ``rounds.jsonl``, read by :class:`RoundsFollower`): yields its ``on_round``."""
    line = ProgressLine()
    line.start(RunStart(scenario, Path(folder)))
    try:
        yield line.on_round
    finally:
        line.close()


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
