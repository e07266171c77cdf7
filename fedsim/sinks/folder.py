"""The run folder: resolved scenario, one JSON line per round, summary, model, plots.

It is the sink every run has and the one the others are read from: checkpoints and privacy
audits write beside it, and a resumed run continues it. Each file is written whole by one
call into :mod:`fedsim.files` (``rounds.jsonl`` is appended to, one line per round).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import tomli_w
from torch import nn

from fedsim.arrays import load_record
from fedsim.config import Scenario
from fedsim.errors import RunStopped, ScenarioError
from fedsim.files import (
    append_text,
    make_folder,
    save_torch,
    sync_size,
    truncate,
    write_json,
    write_text,
)
from fedsim.lock import clear, is_empty
from fedsim.sinks.plots import plot_learning_curves
from fedsim.sinks.summary import finite, summarize, with_derived


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write into a non-empty folder unless ``overwrite`` (never silently)."""
    if out.exists() and not out.is_dir():
        raise ScenarioError(f"output path {str(out)!r} exists and is not a folder; use --out DIR")
    if out.is_dir() and not is_empty(out) and not overwrite:
        raise ScenarioError(
            f"output folder {str(out)!r} is not empty; pass --overwrite to replace it or "
            "--out DIR to write elsewhere"
        )


def stop_entry(exc: RunStopped) -> dict:
    """``summary.json`` ``stopped``: the round, why, and whether it was a planned end
    (``kind`` ``early_stop`` or ``privacy_budget``, ``planned``) or a failure."""
    return {"round": exc.round, "reason": str(exc), "kind": exc.kind, "planned": exc.planned}


class RunFolder:
    """Writes one run's results folder as the run goes.

    With ``resume`` (a :class:`fedsim.checkpoint.Checkpoint` of this folder), it continues the
    folder instead: ``rounds.jsonl`` is cut back to the rounds the checkpoint covers (a run
    killed mid-round may have written more) and appended to from there. The checkpointer
    reads ``out``, :meth:`rounds_position`, :meth:`elapsed` and ``resumed_from`` from it.
    """

    def __init__(self, out: str | Path, overwrite: bool = False, plots: bool = True,
                 resume=None) -> None:
        self.out = Path(out)
        self.overwrite = overwrite
        self.plots = plots
        self.checkpoint = resume  # fedsim.checkpoint.Checkpoint, or None for a fresh run
        self.resumed_from: list[int] = (
            [*resume.meta.get("resumed_from", []), resume.round] if resume is not None else []
        )
        self.rounds: list[dict] = []
        self.notes: dict = {}
        self.summary: dict | None = None
        self.checkpoints = {"count": 0, "seconds": 0.0, "last_bytes": 0}
        self._t0 = time.perf_counter()

    @property
    def resumed_round(self) -> int | None:
        """The round the resumed checkpoint holds (None for a fresh run)."""
        return self.checkpoint.round if self.checkpoint is not None else None

    def prepare(self) -> None:
        """Check and create the folder (before any training)."""
        if self.checkpoint is not None:
            return  # resuming: the folder is this run's own
        check_output_dir(self.out, self.overwrite)
        if self.out.is_dir() and self.overwrite:
            clear(self.out, "fedsim run --overwrite")  # the folder's lock stays held
        make_folder(self.out)

    def start(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self._t0 = time.perf_counter()
        if self.checkpoint is not None:
            truncate(self.out / "rounds.jsonl", int(self.checkpoint.meta["rounds_bytes"]))
            self.rounds = list(self.checkpoint.rounds)
            self._t0 -= float(self.checkpoint.meta.get("elapsed_seconds", 0.0))
            return
        make_folder(self.out)
        write_text(self.out / "scenario.toml", tomli_w.dumps(scenario.to_dict()))
        write_text(self.out / "rounds.jsonl", "")

    def on_round(self, record: dict) -> dict:
        """Append ``record`` (with its derived scalars, NaN/Inf as null) to ``rounds.jsonl``;
        returns it as written, for the other sinks."""
        record = finite(with_derived(record))
        self.rounds.append(record)
        append_text(self.out / "rounds.jsonl", json.dumps(record, sort_keys=True) + "\n")
        return record

    def note(self, key: str, value) -> None:
        """A top-level ``summary.json`` section the run contributes (e.g. ``dp``)."""
        self.notes[key] = value

    def rounds_position(self) -> tuple[int, int]:
        """(lines, bytes) of ``rounds.jsonl`` so far, flushed to disk (for a checkpoint)."""
        return len(self.rounds), sync_size(self.out / "rounds.jsonl")

    def on_checkpoint(self, seconds: float, size: int) -> None:
        """A checkpoint was written (its cost goes to summary.json ``timing.checkpoints``)."""
        self.checkpoints["count"] += 1
        self.checkpoints["seconds"] += seconds
        self.checkpoints["last_bytes"] = size

    def elapsed(self) -> float:
        """Seconds this run has been going, over every resumed part."""
        return time.perf_counter() - self._t0

    def finish(self, arrays, model: nn.Module, stop: RunStopped | None = None) -> dict:
        """Write ``model.pt`` (``arrays`` loaded into ``model``) and the learning curves, and
        make the summary (:attr:`summary`); ``stop``: the run ended before its last round
        (why, in ``stopped``). ``summary.json`` is not written yet: :meth:`write_summary`
        writes it once every file of the folder is (it marks the run finished: ``--resume``
        refuses the folder, a sweep skips the cell). Returns the summary."""
        load_record(model, arrays)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        save_torch(state, self.out / "model.pt")
        summary = summarize(self.rounds, self.scenario, self.elapsed())
        if self.resumed_from:
            summary["resumed_from"] = self.resumed_from
        summary["timing"]["checkpoints"] = dict(self.checkpoints)  # of this (resumed) part
        extra = {"stopped": stop_entry(stop)} if stop is not None else {}
        self.summary = finite({**summary, **self.notes, **extra})
        if self.plots:
            plot_learning_curves(self.rounds, self.out / "learning_curves.png",
                                 title=self.scenario.name,
                                 population=self.scenario.num_participating)
        return self.summary

    def write_summary(self) -> None:
        """(Re)write ``summary.json`` from :attr:`summary`."""
        write_json(self.out / "summary.json", self.summary, indent=2)
