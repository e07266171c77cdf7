"""The result-sink interface: where a run's scenario, rounds and summary go.

A sink hears a run in four calls — :meth:`Sink.start` with the resolved scenario,
:meth:`Sink.on_round` with each round's record, :meth:`Sink.end` with the summary and the
run folder's files, or :meth:`Sink.error` when the run raised — as PyTorch Lightning's loggers
hear a trainer (``log_hyperparams``, ``log_metrics(metrics, step)``, ``finalize(status)``) and
pfl's ``TrainingProcessCallback`` hears a training loop. fedsim's server-side evaluation is
part of the round it follows (an evaluated round's record carries ``global_test_*``), so
there is no separate evaluation call. Sinks are registered by name in :data:`SINKS`; a
scenario names the optional ones in ``output.sinks``; the run folder, ``rounds.csv`` and the
progress line are always on (:mod:`fedsim.sinks.fanout` composes them).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fedsim.config import Scenario
from fedsim.errors import ScenarioError
from fedsim.registry import Registry


@dataclass(frozen=True)
class Tracking:
    """How a run's trackers join a larger study: a sweep sets it for each of its cells.

    ``group`` (W&B's run group, the sweep's name), ``experiment`` (the MLflow experiment)
    and ``mlflow_parent`` (the sweep's parent MLflow run id) with ``mlflow_uri`` (the
    sweep's tracking store, shared by its cells); empty = the run's own defaults.
    """

    group: str = ""
    experiment: str = ""
    mlflow_parent: str = ""
    mlflow_uri: str = ""


@dataclass(frozen=True)
class RunStart:
    """What a sink learns when the run starts."""

    scenario: Scenario
    folder: Path  # the run's results folder
    resumed_round: int | None = None  # resuming: the round the checkpoint holds
    tracking: Tracking = field(default_factory=Tracking)


#: files of a run folder that are not results: checkpoints (large, and only for --resume),
#: client-state journals, an MLflow store kept there, the trackers' run ids
NOT_ARTIFACTS = ("checkpoint*.pt", "client_states.*", "mlflow.db", "trackers.json", ".*")


@dataclass(frozen=True)
class RunEnd:
    """What a sink learns when the run has ended, the run folder written."""

    summary: dict  # as in summary.json
    rounds: list[dict]  # every round's record, as in rounds.jsonl
    folder: Path

    def artifacts(self) -> list[Path]:
        """The run folder's result files now (scenario, rounds, tables, summary, model,
        figures): its top-level files but checkpoints, journals and hidden files."""
        return sorted(p for p in self.folder.iterdir() if p.is_file()
                      and not any(p.match(pattern) for pattern in NOT_ARTIFACTS))


class Sink:
    """One place results go. Every call is optional (the defaults do nothing).

    ``requires`` names the import packages the sink needs and ``extra`` the pip extra that
    installs them: a scenario naming a sink whose package is missing is refused before
    anything runs (:func:`check_packages`).
    """

    name: str = ""
    requires: tuple[str, ...] = ()
    extra: str = ""
    writes_folder: bool = False  # writes into the run folder: ends before summary.json
    # (which marks the run finished) and the trackers (which copy the folder's files)

    def start(self, run: RunStart) -> None:
        """The run starts (or resumes): the resolved scenario and where it writes."""

    def on_round(self, record: dict) -> None:
        """A round's record, as written to ``rounds.jsonl`` (round 0 = the initial model)."""

    def end(self, result: RunEnd) -> None:
        """The run ended with a summary (``summary["stopped"]`` says if it stopped early)."""

    def error(self, exc: BaseException) -> None:
        """The run raised ``exc`` (a crash, an interrupt) before it could end."""


#: optional sinks by name (``output.sinks``); the modules of :mod:`fedsim.sinks` fill it
SINKS: Registry[type[Sink]] = Registry("sink")

#: sinks every run has, whether named or not (naming them changes nothing)
ALWAYS_ON = ("csv",)


def sink_classes(names: Iterable[str]) -> list[type[Sink]]:
    """The classes of the sinks ``names`` plus the always-on ones (unknown names: the
    registry's ScenarioError with the valid ones)."""
    ordered = [SINKS.get(name, key="output.sinks")
               for name in dict.fromkeys([*ALWAYS_ON, *names])]
    return sorted(ordered, key=lambda cls: not cls.writes_folder)  # stable: named order


def folder_sinks(names: Iterable[str]) -> tuple[str, ...]:
    """The sinks among ``names`` that write into the run folder (its tables), without those
    that report elsewhere (the trackers): what a sweep's tuning cells keep."""
    return tuple(name for name in names if SINKS.get(name, key="output.sinks").writes_folder)


def check_packages(names: Iterable[str]) -> None:
    """ScenarioError naming the pip extra when a named sink's package is not installed."""
    for cls in sink_classes(names):
        missing = [p for p in cls.requires if importlib.util.find_spec(p) is None]
        if missing:
            raise ScenarioError(
                f"output.sinks names {cls.name!r}, which needs the {', '.join(missing)} "
                f"package{'s' if len(missing) > 1 else ''}: pip install 'fedsim[{cls.extra}]' "
                f"(or drop {cls.name!r} from output.sinks)")
