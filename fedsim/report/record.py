"""The results folder: resolved scenario, one JSON line per round, summary, model, plots."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import tomli_w
import torch
from torch import nn

from fedsim.arrays import load_record
from fedsim.config import Scenario
from fedsim.errors import ScenarioError


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
        "engine": scenario.engine.kind,
    }
    if "hybrid_alpha" in last:
        summary["hybrid_alpha"] = last["hybrid_alpha"]
    for key in ("personalized_accuracy", "personalized_holdout_accuracy",
                "personalized_participation_gap"):
        if key in last:  # strategies whose clients keep local arrays (FedBN, SiloBN, ...)
            summary["final"][key] = last[key]
    return summary


class RunRecorder:
    """Writes one run's results folder as the run goes (a ServerApp result sink)."""

    def __init__(self, out: str | Path, overwrite: bool = False,
                 progress: Callable[[dict], None] | None = None, plots: bool = True) -> None:
        self.out = Path(out)
        self.overwrite = overwrite
        self.progress = progress
        self.plots = plots
        self.rounds: list[dict] = []
        self.notes: dict = {}
        self.summary: dict | None = None
        self._t0 = time.perf_counter()

    def prepare(self) -> None:
        """Check and create the folder (before any training)."""
        check_output_dir(self.out, self.overwrite)
        if self.out.is_dir() and self.overwrite:
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def start(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self._t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "scenario.toml").write_text(tomli_w.dumps(scenario.to_dict()))
        (self.out / "rounds.jsonl").write_text("")

    def on_round(self, record: dict) -> None:
        record = _finite(record)
        self.rounds.append(record)
        with open(self.out / "rounds.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        if self.progress is not None:
            self.progress(record)

    def note(self, key: str, value) -> None:
        """A top-level ``summary.json`` section the run contributes (e.g. ``dp``)."""
        self.notes[key] = value

    def finish(self, arrays, model: nn.Module) -> None:
        load_record(model, arrays)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save(state, self.out / "model.pt")
        seconds = time.perf_counter() - self._t0
        self.summary = _finite({**summarize(self.rounds, self.scenario, seconds), **self.notes})
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        if self.plots:
            from fedsim.report.plots import plot_learning_curves

            plot_learning_curves(self.rounds, self.out / "learning_curves.png",
                                 title=self.scenario.name)
