"""The results folder: resolved scenario, one JSON line per round, summary, model, plots."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import tomli_w
import torch
from torch import nn

from fedsim.arrays import load_record
from fedsim.config import Scenario
from fedsim.errors import ScenarioError
from fedsim.report.plots import plot_learning_curves
from fedsim.server.client_dp import summarize_client_dp


def _finite(obj):
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write into a non-empty folder unless ``overwrite`` (never silently)."""
    if out.exists() and not out.is_dir():
        raise ScenarioError(f"output path {str(out)!r} exists and is not a folder; use --out DIR")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ScenarioError(
            f"output folder {str(out)!r} is not empty; pass --overwrite to replace it or "
            "--out DIR to write elsewhere"
        )


def with_derived(record: dict) -> dict:
    """``record`` plus the scalars claims compare that a round's metrics imply:
    ``own_model_accuracy`` (each client's accuracy with the model it uses: its personalized
    one where it keeps local arrays, else the global one) and ``hybrid_alpha_mean``."""
    out = dict(record)
    own = record.get("personalized_accuracy") or record.get("client_accuracy")
    if own is not None:
        out["own_model_accuracy"] = own
    alphas = record.get("hybrid_alpha")
    if alphas:
        out["hybrid_alpha_mean"] = sum(alphas.values()) / len(alphas)
    return out


def summarize(rounds: list[dict], scenario: Scenario, seconds: float) -> dict:
    """``summary.json``: final metrics, generalization gaps and throughput."""
    evaluated = [r for r in rounds if "global_test_accuracy" in r]
    last = evaluated[-1] if evaluated else {}
    trained = [r for r in rounds if r.get("round", 0) >= 1]
    updates = sum(r.get("updates", 0) for r in trained)
    train_seconds = sum(r.get("train_seconds", 0.0) for r in trained)
    summary = {
        "scenario": scenario.name,
        "final": {
            "round": last.get("round"),
            "global_test_accuracy": last.get("global_test_accuracy"),
            "global_test_loss": last.get("global_test_loss"),
            "client_accuracy": last.get("client_accuracy"),
            "client_train_accuracy": last.get("client_train_accuracy"),
        },
        "generalization": last.get("generalization"),
        "timing": {
            "seconds": seconds,
            "train_seconds": train_seconds,
            "client_updates": updates,
            "client_updates_per_s": updates / train_seconds if train_seconds > 0 else None,
        },
        "failures": sum(len(r.get("failures", [])) for r in trained),
        "failure_reasons": dict(sorted(Counter(
            f.get("reason") for r in trained for f in r.get("failures", [])).items())),
        "engine": scenario.engine.kind,
        "communication": {  # train messages' arrays, in bytes (fedsim.client.compress)
            f"bytes_{way}": sum(r["communication"][way]["total"] for r in trained
                                if "communication" in r)
            for way in ("uploaded", "downloaded")},
    }
    client_dp = summarize_client_dp(trained, scenario)
    if client_dp is not None:  # [client.dp]: DP-SGD on the clients
        summary["client_dp"] = client_dp
    if "hybrid_alpha" in last:
        summary["hybrid_alpha"] = last["hybrid_alpha"]
    for key in ("personalized_accuracy", "personalized_holdout_accuracy",
                "personalized_participation_gap"):
        if key in last:  # strategies whose clients keep local arrays (FedBN, SiloBN, ...)
            summary["final"][key] = last[key]
    for key in ("own_model_accuracy", "hybrid_alpha_mean", "hessian_max_eig", "sharpness",
                "global_test_perplexity", "client_perplexity"):
        if key in last:  # derived (with_derived), hybrid norms, output.sharpness, text
            summary["final"][key] = last[key]
    return summary


class RunRecorder:
    """Writes one run's results folder as the run goes (a ServerApp result sink).

    With ``resume`` (a checkpoint of this folder), it continues the folder instead:
    ``rounds.jsonl`` is cut back to the rounds the checkpoint covers (a run killed mid-round
    may have written more) and appended to from there.
    """

    def __init__(self, out: str | Path, overwrite: bool = False,
                 progress: Callable[[dict], None] | None = None, plots: bool = True,
                 resume=None) -> None:
        self.out = Path(out)
        self.overwrite = overwrite
        self.progress = progress
        self.plots = plots
        self.checkpoint = resume  # fedsim.checkpoint.Checkpoint, read by the ServerApp
        self.resumed_from: list[int] = (
            [*resume.meta.get("resumed_from", []), resume.round] if resume is not None else []
        )
        self.rounds: list[dict] = []
        self.notes: dict = {}
        self.summary: dict | None = None
        self.stopped: Exception | None = None
        self.checkpoints = {"count": 0, "seconds": 0.0, "last_bytes": 0}
        self._t0 = time.perf_counter()

    def prepare(self) -> None:
        """Check and create the folder (before any training)."""
        if self.checkpoint is not None:
            return  # resuming: the folder is this run's own
        check_output_dir(self.out, self.overwrite)
        if self.out.is_dir() and self.overwrite:
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def start(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self._t0 = time.perf_counter()
        if self.checkpoint is not None:
            with open(self.out / "rounds.jsonl", "r+b") as fh:
                fh.truncate(int(self.checkpoint.meta["rounds_bytes"]))
            self.rounds = list(self.checkpoint.rounds)
            self._t0 -= float(self.checkpoint.meta.get("elapsed_seconds", 0.0))
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "scenario.toml").write_text(tomli_w.dumps(scenario.to_dict()))
        (self.out / "rounds.jsonl").write_text("")

    def on_round(self, record: dict) -> None:
        record = _finite(with_derived(record))
        self.rounds.append(record)
        with open(self.out / "rounds.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        if self.progress is not None:
            self.progress(record)

    def note(self, key: str, value) -> None:
        """A top-level ``summary.json`` section the run contributes (e.g. ``dp``)."""
        self.notes[key] = value

    def rounds_position(self) -> tuple[int, int]:
        """(lines, bytes) of ``rounds.jsonl`` so far, flushed to disk (for a checkpoint)."""
        path = self.out / "rounds.jsonl"
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
            size = fh.seek(0, os.SEEK_END)
        return len(self.rounds), size

    def on_checkpoint(self, seconds: float, size: int) -> None:
        """A checkpoint was written (its cost goes to summary.json ``timing.checkpoints``)."""
        self.checkpoints["count"] += 1
        self.checkpoints["seconds"] += seconds
        self.checkpoints["last_bytes"] = size

    def elapsed(self) -> float:
        """Seconds this run has been going, over every resumed part."""
        return time.perf_counter() - self._t0

    def _write_results(self, arrays, model: nn.Module, extra: dict) -> None:
        load_record(model, arrays)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save(state, self.out / "model.pt")
        summary = summarize(self.rounds, self.scenario, self.elapsed())
        if self.resumed_from:
            summary["resumed_from"] = self.resumed_from
        summary["timing"]["checkpoints"] = dict(self.checkpoints)  # of this (resumed) part
        self.summary = _finite({**summary, **self.notes, **extra})
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        if self.plots:
            plot_learning_curves(self.rounds, self.out / "learning_curves.png",
                                 title=self.scenario.name,
                                 population=self.scenario.num_participating)

    def finish(self, arrays, model: nn.Module) -> None:
        self._write_results(arrays, model, {})

    def stop(self, exc: Exception, arrays, model: nn.Module, clean: bool = False) -> None:
        """The run stopped early (RunStopped): keep what it got, say why in summary.json.

        ``clean``: a planned end (the DP budget), not a failure; the caller does not re-raise.
        """
        if not clean:
            self.stopped = exc
        self._write_results(arrays, model, {
            "stopped": {"round": getattr(exc, "round", None), "reason": str(exc)}})
