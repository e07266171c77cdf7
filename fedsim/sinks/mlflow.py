"""MLflow: one MLflow run per fedsim run; a sweep is a parent run with its cells as children.

Logged through ``MlflowClient`` (no global active run, so sweep cells in one process and in
worker processes behave alike), which ``mlflow-skinny`` provides (``fedsim[trackers]``):
the logging client without MLflow's server and UI dependencies, which a simulator that only
records runs does not need (``mlflow ui`` comes with the full ``mlflow`` package).

- params: the flattened resolved scenario (``model.norm``, ``client.lr``, ...; lists as JSON);
- metrics per round, step = round: every number of the round record, dotted
  (``global_test_accuracy``, ``client_accuracy.p10``, ``communication.uploaded.total``);
  at the end every number of ``summary.json`` as ``summary.<path>`` (``summary.final.
  global_test_accuracy``, ``summary.privacy.mia.loss.auc``, ...);
- artifacts: the run folder's result files (scenario, rounds, tables, summary, model,
  figures; not checkpoints);
- status FINISHED, FAILED (a run that stopped on a failure or raised) or KILLED (Ctrl-C).

Where: ``output.mlflow_uri``, else ``MLFLOW_TRACKING_URI``, else a local SQLite store in the
run folder (``<output.dir>/mlflow.db``, artifacts in ``<output.dir>/mlartifacts``; a sweep's
store is ``<sweep>/mlflow.db``, shared by its cells). The experiment is the scenario's name
(a sweep's for its cells). A resumed run continues its MLflow run (its id is kept in the
folder's ``trackers.json``); the rounds between the checkpoint and the interruption are
logged again at the same steps.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedsim.config import Scenario
from fedsim.sinks.base import SINKS, RunEnd, RunStart, Sink, Tracking
from fedsim.sinks.flat import flatten, scalars
from fedsim.sinks.ids import read_ids, write_ids

MAX_PARAM = 6000  # MLflow's longest param value
BATCH_PARAMS, BATCH_METRICS = 100, 1000  # MLflow's log_batch limits


def store(scenario: Scenario, folder: Path, tracking: Tracking) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None for MLflow's default):
    the sweep's store, ``output.mlflow_uri``, ``MLFLOW_TRACKING_URI``, or SQLite in
    ``folder``."""
    uri = tracking.mlflow_uri or scenario.output.mlflow_uri or os.environ.get(
        "MLFLOW_TRACKING_URI", "")
    if uri:
        return uri, None
    folder = folder.resolve()
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "mlartifacts").as_uri()


def _client(uri: str):
    from mlflow.tracking import MlflowClient  # optional: fedsim[trackers]

    # MLflow and alembic log each database migration at INFO: keep the run's output clean
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created if it does not exist."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def params(scenario: Scenario) -> dict[str, str]:
    """The flattened scenario as MLflow params (text; lists as JSON; at most 6,000
    characters, a longer value cut with a final ``…``)."""
    out = {}
    for key, value in flatten(scenario.to_dict()).items():
        text = value if isinstance(value, str) else json.dumps(value)
        out[key] = text if len(text) <= MAX_PARAM else text[: MAX_PARAM - 1] + "…"
    return out


def log_numbers(client, run_id: str, numbers: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v in numbers.items()]
    for chunk in _chunks(metrics, BATCH_METRICS):
        client.log_batch(run_id, metrics=chunk)


def start_run(client, experiment: str, artifact_location: str | None, name: str,
              values: dict[str, Any], parent: str = "") -> str:
    """A new MLflow run named ``name`` with params ``values`` (a child of ``parent``)."""
    from mlflow.entities import Param

    tags = {"mlflow.parentRunId": parent} if parent else {}
    run = client.create_run(experiment_id(client, experiment, artifact_location),
                            run_name=name, tags=tags)
    run_id = run.info.run_id
    items = [Param(k, v) for k, v in values.items()]
    for chunk in _chunks(items, BATCH_PARAMS):
        client.log_batch(run_id, params=chunk)
    return run_id


def sweep_parent(base: Scenario, root: Path) -> Tracking:
    """The sweep's parent MLflow run (continued when the sweep is resumed), as the
    :class:`Tracking` its cells report under."""
    uri, artifacts = store(base, root, Tracking())
    client = _client(uri)
    ids = read_ids(root).get("mlflow") or {}
    if ids.get("run_id") and ids.get("tracking_uri") == uri:
        client.update_run(ids["run_id"], status="RUNNING")
        run_id = ids["run_id"]
    else:
        values = {f"sweep.{k}": json.dumps(v) for k, v in base.sweep.grid.items()}
        run_id = start_run(client, base.name, artifacts, base.name, values)
        write_ids(root, "mlflow", {"run_id": run_id, "tracking_uri": uri})
    return Tracking(group=base.name, experiment=base.name, mlflow_parent=run_id,
                    mlflow_uri=uri)


def end_sweep_parent(tracking: Tracking, root: Path, status: str = "FINISHED") -> None:
    """Attach the sweep's report files to its parent run and end it."""
    client = _client(tracking.mlflow_uri)
    for name in ("report.md", "report.json", "sweep.json", "cells.csv", "claims.csv"):
        if (root / name).is_file():
            client.log_artifact(tracking.mlflow_parent, str(root / name))
    client.set_terminated(tracking.mlflow_parent, status)


@SINKS.register("mlflow")
class MLflow(Sink):
    """One MLflow run per fedsim run (module doc)."""

    name = "mlflow"
    requires = ("mlflow",)
    extra = "trackers"

    def start(self, run: RunStart) -> None:
        uri, artifacts = store(run.scenario, run.folder, run.tracking)
        self.client = _client(uri)
        ids = read_ids(run.folder).get("mlflow") or {}
        if (run.resumed_round is not None and ids.get("run_id")
                and ids.get("tracking_uri") == uri):
            self.run_id = ids["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = run.tracking.experiment or run.scenario.name
        name = run.scenario.name.rsplit("/", 1)[-1] if run.tracking.mlflow_parent else \
            run.scenario.name
        self.run_id = start_run(self.client, experiment, artifacts, name,
                                params(run.scenario), parent=run.tracking.mlflow_parent)
        write_ids(run.folder, "mlflow", {"run_id": self.run_id, "tracking_uri": uri})

    def on_round(self, record: dict) -> None:
        numbers = scalars(flatten(record))
        numbers.pop("round", None)
        log_numbers(self.client, self.run_id, numbers, int(record["round"]))

    def end(self, result: RunEnd) -> None:
        numbers = {f"summary.{k}": v for k, v in scalars(flatten(result.summary)).items()}
        last = result.rounds[-1]["round"] if result.rounds else 0
        log_numbers(self.client, self.run_id, numbers, int(last))
        for path in result.artifacts():
            self.client.log_artifact(self.run_id, str(path))
        stopped = result.summary.get("stopped") or {}
        failed = stopped.get("kind") == "failure"
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")

    def error(self, exc: BaseException) -> None:
        killed = isinstance(exc, KeyboardInterrupt)  # Ctrl-C, SIGTERM (fedsim.interrupt)
        self.client.set_terminated(self.run_id, "KILLED" if killed else "FAILED")
