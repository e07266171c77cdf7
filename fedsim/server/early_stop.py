"""Early stopping on a validation (or training) metric: ``[server.early_stop]``.

The stopper watches one metric of the round records — never a test metric, and a validation
metric only with a validation split (both refused when the scenario is parsed,
:mod:`fedsim.config`) — and keeps the best value and how many rounds recording the metric
have passed without beating it by more than ``min_delta``; ``patience`` of them end the run
cleanly (pfl's ``EarlyStopping`` callback, Keras' ``EarlyStopping``). Its state is a
function of the records alone, so a resumed run rebuilds it by replaying the rounds its
checkpoint covers (:meth:`EarlyStopper.replay`) and stops at the same round as the run that
was never interrupted.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedsim.config import EarlyStopConfig
from fedsim.errors import RunStopped


class EarlyStopper:
    """The early-stopping state of one run (module doc)."""

    def __init__(self, cfg: EarlyStopConfig) -> None:
        self.cfg = cfg
        self.best: float | None = None
        self.best_round: int | None = None
        self.waited = 0  # rounds recording the metric since the best one
        self.reason: str | None = None  # why the run stops (set once it should)

    def _expects(self, record: dict) -> bool:
        """Whether ``record`` must hold the metric and may not: the clients' train_* every
        trained round (a strategy may report no training metrics). A validation metric is in
        every evaluated round's record, since a scenario monitoring one holds a validation
        split out (checked when it is parsed, :class:`fedsim.config.Scenario`)."""
        return (self.cfg.metric.startswith("train_") and record.get("round", 0) >= 1
                and not record.get("stopped"))

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.cfg.direction == "max":
            return value > self.best + self.cfg.min_delta
        return value < self.best - self.cfg.min_delta

    def update(self, record: dict) -> str | None:
        """Take one round's record; returns why the run stops after it (or None).

        Raises RunStopped when a trained round does not record a train_* metric (a strategy
        that reports no training metrics).
        """
        value = record.get(self.cfg.metric)
        if value is None:
            if self._expects(record):
                raise RunStopped(
                    f"round {record.get('round')}: server.early_stop.metric = "
                    f"{self.cfg.metric!r} is not in the round's record (train_* needs a "
                    "strategy that reports the clients' training metrics); monitor "
                    "validation_accuracy or validation_loss (with data.validation_fraction "
                    "> 0) or drop [server.early_stop]",
                    round=record.get("round"))
            return None
        rnd = int(record["round"])
        if rnd < 1:  # the initial model is no result to keep: count from the first round
            return None
        if self._better(float(value)):
            self.best, self.best_round, self.waited = float(value), rnd, 0
        else:
            self.waited += 1
        if self.waited >= self.cfg.patience:
            self.reason = (
                f"early stop after round {rnd}: {self.cfg.metric} did not improve on its "
                f"best, {self.best:.6g} at round {self.best_round}, by more than "
                f"min_delta = {self.cfg.min_delta:g} in {self.waited} round(s) "
                f"(patience {self.cfg.patience})")
        return self.reason

    def state(self) -> dict:
        """What ``rounds.jsonl`` records of the stopper after a round that saw the metric."""
        return {"metric": self.cfg.metric, "best": self.best, "best_round": self.best_round,
                "rounds_without_improvement": self.waited, "stop": self.reason is not None}

    def replay(self, records: Iterable[dict]) -> EarlyStopper:
        """The state after ``records`` (a resumed run's earlier rounds); returns self."""
        for record in records:
            if record.get(self.cfg.metric) is not None:
                self.update(record)
        return self
