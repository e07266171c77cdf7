"""TensorBoard: each round's numbers as scalars, the run's figures, the scenario, HParams.

Written with ``torch.utils.tensorboard.SummaryWriter``, which needs only the ``tensorboard``
package (``fedsim[trackers]``), not TensorFlow. Under ``output.tensorboard_dir`` each run
writes into a folder named after the scenario (a sweep's cells are ``<sweep>/<cell>``), so
``tensorboard --logdir DIR`` compares them; by default a run writes ``<output.dir>/tb``.

- scalars per round, step = round: every number of the round record, flattened, ``.`` read
  as ``/`` (``global_test_accuracy``, ``client_accuracy/p10``, ``generalization/
  participation_gap``, ``communication/uploaded/total``, ``hybrid_alpha/<layer>``,
  ``client_dp_epsilon_max``, ...); the privacy audit's per-round results at the end
  (``privacy/mia/<attack>/<metric>``, from ``summary.json`` ``privacy.mia_by_round``);
- images: the run folder's figures (learning curves, privacy ROC and inversion), at the
  last round;
- text: the resolved scenario (``scenario``);
- HParams: the flattened scenario against every number of ``summary.json``
  (``final/global_test_accuracy``, ``privacy/mia/loss/auc``, ...).

A resumed run purges the events after its checkpoint's round (``purge_step``), so rounds a
killed run recorded twice appear once.
"""

from __future__ import annotations

import json
from pathlib import Path

import tomli_w

from fedsim.config import Scenario
from fedsim.sinks.base import SINKS, RunEnd, RunStart, Sink
from fedsim.sinks.flat import flatten, scalars


def tensorboard_dir(scenario: Scenario, folder: Path) -> Path:
    """Where a run's events go: ``output.tensorboard_dir/<scenario name>``, else
    ``<run folder>/tb``."""
    if scenario.output.tensorboard_dir:
        return Path(scenario.output.tensorboard_dir) / scenario.name
    return folder / "tb"


def hparams(scenario: Scenario) -> dict[str, float | str | bool]:
    """The scenario as HParams values: numbers and text (lists as JSON)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
            for k, v in flatten(scenario.to_dict()).items()}


def tags(row: dict) -> dict[str, float]:
    """The numbers of a flat row as TensorBoard tags (``a.b`` → ``a/b``)."""
    return {k.replace(".", "/"): v for k, v in scalars(row).items()}


def _scenario_text(scenario: Scenario) -> str:
    # markdown: four spaces make a code block, so the TOML keeps its lines
    return "\n".join("    " + line for line in tomli_w.dumps(scenario.to_dict()).splitlines())


@SINKS.register("tensorboard")
class TensorBoard(Sink):
    """Event files for TensorBoard (module doc)."""

    name = "tensorboard"
    requires = ("tensorboard",)
    extra = "trackers"

    def start(self, run: RunStart) -> None:
        from torch.utils.tensorboard import SummaryWriter  # optional: fedsim[trackers]

        self.scenario = run.scenario
        self.logdir = tensorboard_dir(run.scenario, run.folder)
        purge = run.resumed_round + 1 if run.resumed_round is not None else None
        self.writer = SummaryWriter(log_dir=str(self.logdir), purge_step=purge)
        if run.resumed_round is None:
            self.writer.add_text("scenario", _scenario_text(run.scenario), 0)
        self.last_round = 0

    def on_round(self, record: dict) -> None:
        step = int(record["round"])
        for tag, value in tags(flatten(record)).items():
            if tag != "round":
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a TensorBoard already open shows the round now
        self.last_round = step

    def end(self, result: RunEnd) -> None:
        from matplotlib.image import imread  # matplotlib draws fedsim's figures already

        summary = result.summary
        for entry in (summary.get("privacy") or {}).get("mia_by_round") or []:
            for attack, metrics in entry.items():  # {"round", "global_test_accuracy", attacks}
                if isinstance(metrics, dict):
                    for tag, value in tags(flatten(metrics)).items():
                        self.writer.add_scalar(f"privacy/mia/{attack}/{tag}", value,
                                               int(entry["round"]))
        for path in result.artifacts():
            if path.suffix == ".png":
                image = imread(path)[..., :3]  # RGB, floats in [0, 1]
                self.writer.add_image(f"figures/{path.stem}", image, self.last_round,
                                      dataformats="HWC")
        metrics = {f"summary/{k}": v for k, v in tags(flatten(summary)).items()}
        self.writer.add_hparams(hparams(self.scenario), metrics, run_name=".",
                                global_step=self.last_round)
        self.writer.close()

    def error(self, exc: BaseException) -> None:
        self.writer.close()
