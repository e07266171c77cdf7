"""The server's one handle on where a run's results go: the run folder, then every sink.

:class:`RunSinks` is what the ServerApp reports to (start, each round, summary notes, the
end) and what the checkpointer and the privacy audit write beside (:attr:`RunSinks.folder`).
The run folder comes first and its failures are the run's own. Any other sink (the progress
line, tables, a tracker) that raises is switched off for the rest of the run with one
``warning:`` line, and ``summary.json`` ``sink_failures`` says where it failed: a tracker
that fails never costs the run or its folder. A file of the results folder that cannot be
written (:class:`fedsim.errors.ResultsNotWritten`: ``rounds.csv``, ``trackers.json``) is no
sink's failure but the run's, as the folder's own files are: it ends the run in one
``error:`` line, resumable from the last checkpoint.

At the end the folder's files come first (``model.pt``, figures), then the sinks that write
into the folder (its tables), then ``summary.json``, which marks the run finished, then the
others (the trackers, which copy the finished folder's files).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from torch import nn

from fedsim.config import Scenario
from fedsim.errors import ResultsNotWritten, RunStopped
from fedsim.sinks.base import RunEnd, RunStart, Sink, Tracking, sink_classes
from fedsim.sinks.folder import RunFolder


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class CallbackSink(Sink):
    """A plain ``on_round(record)`` callable as a sink (``fedsim.run(progress=...)``)."""

    name = "progress callback"

    def __init__(self, on_round: Callable[[dict], None]) -> None:
        self.callback = on_round

    def on_round(self, record: dict) -> None:
        self.callback(record)


def make_sinks(scenario: Scenario) -> list[Sink]:
    """The sinks ``scenario`` names in ``output.sinks``, with the always-on ones."""
    return [cls() for cls in sink_classes(scenario.output.sinks)]


class RunSinks:
    """A run folder and the other sinks of one run, fanned out in order.

    Parameters
    ----------
    folder:
        The run folder (fresh, or resumed from a checkpoint).
    sinks:
        Every other sink, in the order they hear the run (:func:`make_sinks`, then what the
        caller adds: the progress line, a callback).
    tracking:
        How trackers join a sweep (:class:`fedsim.sinks.base.Tracking`).
    warn:
        Hears the one line about a sink that failed (default: ``warning: ...`` on stderr).
    """

    def __init__(self, folder: RunFolder, sinks: Iterable[Sink] = (),
                 tracking: Tracking | None = None,
                 warn: Callable[[str], None] = _warn) -> None:
        self.folder = folder
        self.sinks: list[Sink] = list(sinks)
        self.tracking = tracking or Tracking()
        self.warn = warn
        self.failures: dict[str, str] = {}  # sink name -> where and how it failed
        self.failure: RunStopped | None = None  # a run that stopped on a failure
        self._round: int | None = None
        self.started = self.ended = False

    @property
    def out(self) -> Path:
        return self.folder.out

    @property
    def resume(self):
        """The checkpoint this run resumes from (None for a fresh run)."""
        return self.folder.checkpoint

    @property
    def rounds(self) -> list[dict]:
        """Every round's record so far, as written (a resumed run's earlier rounds too)."""
        return self.folder.rounds

    @property
    def summary(self) -> dict | None:
        return self.folder.summary

    def start(self, scenario: Scenario) -> None:
        self.folder.start(scenario)
        self.started = True
        self._each("start", RunStart(scenario, self.folder.out, self.folder.resumed_round,
                                     self.tracking))

    def on_round(self, record: dict) -> None:
        written = self.folder.on_round(record)
        self._round = written.get("round")
        self._each("on_round", written)

    def note(self, key: str, value) -> None:
        """A top-level ``summary.json`` section the run contributes (e.g. ``dp``)."""
        self.folder.note(key, value)

    def finish(self, arrays, model: nn.Module, stop: RunStopped | None = None) -> dict:
        """Write the run folder's results, then end every sink (in the order of the module
        doc); ``stop``: the run ended before its last round (a failure is kept in
        :attr:`failure` for the caller to raise)."""
        if stop is not None and not stop.planned:
            self.failure = stop
        self._note_failures()
        summary = self.folder.finish(arrays, model, stop)
        end = RunEnd(summary, self.folder.rounds, self.folder.out)
        in_folder = [s for s in self.sinks if s.writes_folder]
        self._each("end", end, where="at the end", only=in_folder)
        if self.failures:
            summary["sink_failures"] = dict(self.failures)
        self.folder.write_summary()
        self.ended = True
        before = dict(self.failures)
        self._each("end", end, where="at the end",
                   only=[s for s in self.sinks if s not in in_folder])
        if self.failures != before:  # a tracker failed while ending: say so in summary.json
            summary["sink_failures"] = dict(self.failures)
            self.folder.write_summary()
        return summary

    def error(self, exc: BaseException) -> None:
        """The run raised ``exc``: every started sink hears it (trackers mark their run
        failed, the progress line stops)."""
        if self.started and not self.ended:
            self._each("error", exc, where="while the run failed")

    def _note_failures(self) -> None:
        if self.failures:
            self.folder.note("sink_failures", dict(self.failures))

    def _each(self, method: str, arg, where: str | None = None,
              only: Iterable[Sink] | None = None) -> None:
        for sink in list(self.sinks if only is None else only):
            try:
                getattr(sink, method)(arg)
            except ResultsNotWritten:  # a file of the results folder: the run's own failure
                raise
            except Exception as exc:  # a sink never takes the run down
                self.sinks.remove(sink)
                at = where or (f"at round {self._round}" if method == "on_round"
                               else "at the start")
                why = f"{type(exc).__name__}: {exc}"
                self.failures[sink.name] = f"{at}: {why}"
                self.warn(f"the {sink.name} sink failed {at} ({why}); it is switched off, "
                          f"the run goes on and its folder {self.folder.out} stays complete")

