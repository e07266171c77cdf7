"""Weights & Biases: config, metrics per round, summary and figures of one run.

Offline unless asked otherwise: ``WANDB_MODE`` if set, else ``output.wandb_mode``
(``"offline"`` by default, so nothing leaves the machine; ``wandb sync`` uploads the run
later). Runs go to ``<output.dir>/wandb/`` (W&B's own layout: ``offline-run-<time>-<id>/
run-<id>.wandb``; ``wandb leet <dir>`` browses them in a terminal). Machine statistics,
metadata, git and code capture are off, and W&B does not wrap stdout/stderr (fedsim's
progress line and ``error:`` lines stay as they are).

- config: the resolved scenario (nested, as in ``scenario.toml``);
- history per round, step = round: every number of the round record, ``.`` read as ``/``
  (``global_test_accuracy``, ``client_accuracy/p10``, ``communication/uploaded/total``, ...);
- summary: every number of ``summary.json``, dotted (``final.global_test_accuracy``, ...);
- figures: the run folder's PNGs as images (``figures/<name>``) at the last round;
- a sweep's cells share a group (the sweep's name), so W&B shows them side by side.

A resumed run continues its W&B run (same id, ``resume="allow"``; its id is kept in the
folder's ``trackers.json``); offline, that is a second run folder which ``wandb sync`` joins.
"""

from __future__ import annotations

import os

from fedsim.config import Scenario
from fedsim.sinks.base import SINKS, RunEnd, RunStart, Sink
from fedsim.sinks.flat import flatten, scalars
from fedsim.sinks.ids import read_ids, write_ids

#: no machine statistics (their probes include cloud metadata addresses), metadata, git,
#: code or requirements capture, and stdout/stderr left alone
QUIET = {"silent": True, "console": "off", "x_disable_stats": True, "x_disable_meta": True,
         "x_disable_machine_info": True, "disable_git": True, "disable_code": True,
         "x_save_requirements": False}


def wandb_mode(scenario: Scenario) -> str:
    """``$WANDB_MODE`` if the user set it, else ``output.wandb_mode`` (offline by default)."""
    return os.environ.get("WANDB_MODE") or scenario.output.wandb_mode


@SINKS.register("wandb")
class WandB(Sink):
    """One W&B run per fedsim run (module doc)."""

    name = "wandb"
    requires = ("wandb",)
    extra = "trackers"

    def start(self, run: RunStart) -> None:
        import wandb  # optional: fedsim[trackers]

        out = run.scenario.output
        mode = wandb_mode(run.scenario)
        resume = {}
        saved = read_ids(run.folder).get("wandb") or {}
        if run.resumed_round is not None and saved.get("id"):
            resume = {"id": saved["id"], "resume": "allow"}
        name = run.scenario.name.rsplit("/", 1)[-1] if run.tracking.group else \
            run.scenario.name
        self.run = wandb.init(project=out.wandb_project, dir=str(run.folder.resolve()),
                              mode=mode, name=name, group=run.tracking.group or None,
                              config=run.scenario.to_dict(), reinit="create_new",
                              settings=wandb.Settings(**QUIET), **resume)
        write_ids(run.folder, "wandb", {"id": self.run.id, "project": out.wandb_project,
                                        "mode": mode})
        self.last_round = 0

    def on_round(self, record: dict) -> None:
        numbers = {k.replace(".", "/"): v for k, v in scalars(flatten(record)).items()}
        numbers.pop("round", None)
        self.last_round = int(record["round"])
        self.run.log(numbers, step=self.last_round)

    def end(self, result: RunEnd) -> None:
        import wandb

        self.run.summary.update(scalars(flatten(result.summary)))
        figures = {f"figures/{p.stem}": wandb.Image(str(p))
                   for p in result.artifacts() if p.suffix == ".png"}
        if figures:
            self.run.log(figures, step=self.last_round)
        stopped = result.summary.get("stopped") or {}
        self.run.finish(exit_code=1 if stopped.get("kind") == "failure" else 0)

    def error(self, exc: BaseException) -> None:
        self.run.finish(exit_code=1)
