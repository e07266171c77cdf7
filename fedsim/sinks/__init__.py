"""Result sinks: where a run's scenario, rounds and summary go (:mod:`fedsim.sinks.base`).

The run folder (:mod:`~fedsim.sinks.folder`), ``rounds.csv`` (:mod:`~fedsim.sinks.tables`)
and the progress line (:mod:`~fedsim.sinks.progress`) are part of every run; TensorBoard,
MLflow, Weights & Biases and Parquet are named in ``output.sinks``. The run layer composes
them into the :class:`~fedsim.sinks.fanout.RunSinks` the server reports to. Importing this
package registers the built-in sinks; a tracker's own package is imported only when a run
uses it.
"""

from fedsim.sinks import mlflow, tables, tensorboard, wandb  # noqa: F401  register themselves
from fedsim.sinks.base import (
    SINKS,
    RunEnd,
    RunStart,
    Sink,
    Tracking,
    check_packages,
    folder_sinks,
    sink_classes,
)
from fedsim.sinks.fanout import CallbackSink, RunSinks, make_sinks
from fedsim.sinks.folder import RunFolder, check_output_dir
from fedsim.sinks.progress import ProgressLine

__all__ = ["SINKS", "CallbackSink", "ProgressLine", "RunEnd", "RunFolder", "RunSinks",
           "RunStart", "Sink", "Tracking", "check_output_dir", "check_packages",
           "folder_sinks", "make_sinks", "sink_classes"]
