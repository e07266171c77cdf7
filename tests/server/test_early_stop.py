"""Early stopping: the rule on scripted values, refusals of test metrics, the stop recorded as
a clean end, the same stop after ``--resume``, and sweeps that see a stopped cell as
finished at its last round."""

import csv
import json
import signal

import pytest
from same_run import assert_same_run  # tests/same_run.py

import fedsim
from fedsim.checkpoint import Checkpointer
from fedsim.cli import main
from fedsim.config import EarlyStopConfig
from fedsim.errors import RunStopped, ScenarioError
from fedsim.interrupt import Interrupted
from fedsim.server.early_stop import EarlyStopper
from fedsim.server.evaluate import Evaluator
from fedsim.sweep import run_sweep

TINY = ["server.rounds=6", "partition.num_clients=12", "server.clients_per_round=3",
        "partition.holdout_clients=0.0", "client.epochs=1", "model.width=8"]
# train_loss of this run: 1.953, 1.758, 1.769, 1.682, 1.450, 1.309 (rounds 1-6): with
# min_delta 0.1 round 2 is the best, rounds 3 and 4 do not beat it by 0.1: stop after round 4
ON_TRAIN_LOSS = TINY + ["server.early_stop.metric=train_loss", "server.early_stop.patience=2",
                        "server.early_stop.min_delta=0.1"]


def feed(cfg: EarlyStopConfig, values: list[float | None]) -> tuple[int | None, EarlyStopper]:
    """Rounds 1.. with ``values`` of the metric; the round after which it stops (or None)."""
    stopper = EarlyStopper(cfg)
    for rnd, value in enumerate(values, start=1):
        record = {"round": rnd, "global_test_accuracy": 0.5, cfg.metric: value}
        if value is None:
            record.pop(cfg.metric)
            record.pop("global_test_accuracy")  # a round that was not evaluated
        if stopper.update(record):
            return rnd, stopper
    return None, stopper


def test_patience_counts_rounds_without_an_improvement_larger_than_min_delta():
    cfg = EarlyStopConfig(metric="validation_accuracy", patience=2, min_delta=0.02)
    # best 0.7 at round 2; 0.69 and 0.71 (< 0.7 + 0.02) make two rounds without improvement
    rnd, stopper = feed(cfg, [0.5, 0.7, 0.69, 0.71, 0.9])
    assert rnd == 4 and (stopper.best, stopper.best_round, stopper.waited) == (0.7, 2, 2)
    assert stopper.reason == ("early stop after round 4: validation_accuracy did not improve "
                              "on its best, 0.7 at round 2, by more than min_delta = 0.02 in "
                              "2 round(s) (patience 2)")
    # rounds that do not record the metric (not evaluated) do not count
    assert feed(cfg, [0.5, 0.7, None, None, 0.69, None, 0.8])[0] is None
    assert feed(cfg, [0.5, 0.7, 0.73, 0.74, 0.75])[0] == 5  # +0.03, then +0.01, +0.01


def test_loss_metrics_improve_downward_and_a_missing_metric_is_an_error():
    cfg = EarlyStopConfig(metric="validation_loss", patience=1)
    assert cfg.direction == "min"
    assert feed(cfg, [2.0, 1.5, 1.5])[0] == 3  # equal is no improvement
    assert feed(cfg, [2.0, 1.5, 1.4, 1.3])[0] is None
    train = EarlyStopper(EarlyStopConfig(metric="train_loss"))
    assert train.update({"round": 0, "global_test_accuracy": 0.1}) is None  # nothing trained
    with pytest.raises(RunStopped, match="'train_loss' is not in the round's record"):
        train.update({"round": 1, "train_loss": None})


@pytest.mark.parametrize(("override", "pattern"), [
    ("server.early_stop.metric=global_test_accuracy", "reads test data"),
    ("server.early_stop.metric=client_accuracy", "reads test data"),
    ("server.early_stop.metric=validation_acc", "use one of validation_accuracy"),
    ("server.early_stop.mode=max", None),  # no metric: off, mode alone is fine
])
def test_test_metrics_and_unknown_names_are_refused_with_the_reason(tmp_path, capsys,
                                                                  override, pattern):
    if pattern is None:
        assert fedsim.load_scenario("scenarios/quickstart.toml", [override])
        return
    code = main(["run", "scenarios/quickstart.toml", "--set", override,
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: server.early_stop.metric")
    assert pattern in err[0] and not (tmp_path / "r").exists()
    with pytest.raises(ScenarioError, match="contradicts validation_loss"):
        fedsim.load_scenario("scenarios/quickstart.toml", [
            "server.early_stop.metric=validation_loss", "server.early_stop.mode=max"])


def records(folder):
    return [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]


def test_a_scripted_validation_metric_stops_the_run_cleanly(tmp_path, capsys, monkeypatch):
    script = iter([0.1, 0.5, 0.7, 0.69, 0.71, 0.9, 0.95])  # rounds 0..6
    evaluate = Evaluator.__call__
    monkeypatch.setattr(Evaluator, "__call__",
                        lambda self, arrays: {**evaluate(self, arrays),
                                              "validation_accuracy": next(script)})
    out = tmp_path / "r"
    code = main(["run", "scenarios/quickstart.toml", "--out", str(out), "--quiet",
                 *[a for s in TINY for a in ("--set", s)],
                 "--set", "data.validation_fraction=0.1",
                 "--set", "server.early_stop.metric=validation_accuracy",
                 "--set", "server.early_stop.patience=2",
                 "--set", "server.early_stop.min_delta=0.02"])
    assert code == 0
    reason = ("early stop after round 4: validation_accuracy did not improve on its best, 0.7 "
              "at round 2, by more than min_delta = 0.02 in 2 round(s) (patience 2)")
    assert f"stopped early: {reason}" in capsys.readouterr().out
    recs = records(out)
    assert [r["round"] for r in recs] == [0, 1, 2, 3, 4]
    assert [r["early_stop"]["rounds_without_improvement"] for r in recs[1:]] == [0, 0, 1, 2]
    assert recs[-1]["stopped"] == reason and recs[-1]["early_stop"]["stop"] is True
    assert all("stopped" not in r for r in recs[:-1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == {"round": 4, "reason": reason, "kind": "early_stop",
                                  "planned": True}
    assert summary["final"]["round"] == 4 and summary["final"]["validation_accuracy"] == 0.71
    assert summary["final"]["global_test_accuracy"] == recs[-1]["global_test_accuracy"]
    assert (out / "model.pt").is_file() and (out / "rounds.csv").is_file()


def test_a_validation_metric_without_a_validation_split_is_refused_before_anything_runs(
        tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["run", "scenarios/quickstart.toml", "--out", str(out), "--quiet",
                 *[a for s in TINY for a in ("--set", s)],
                 "--set", "server.early_stop.metric=validation_loss"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        "error: server.early_stop.metric = 'validation_loss' is measured on the validation "
        "split, but data.validation_fraction = 0 holds none out; set "
        "data.validation_fraction = 0.1 (a tenth of the training pool) or monitor the "
        "clients' train_loss / train_accuracy"]
    assert not out.exists()
    # with the split it parses; the clients' train metrics need none
    fedsim.load_scenario("scenarios/quickstart.toml", ["server.early_stop.metric=validation_loss",
                                                       "data.validation_fraction=0.1"])
    fedsim.load_scenario("scenarios/quickstart.toml", ["server.early_stop.metric=train_loss"])


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    return fedsim.run("scenarios/quickstart.toml", ON_TRAIN_LOSS,
                      out=tmp_path_factory.mktemp("early") / "ref")


def test_a_real_train_loss_stops_after_round_4(stopped_run):
    assert stopped_run.summary["stopped"]["round"] == 4
    assert stopped_run.summary["stopped"]["kind"] == "early_stop"
    assert [r["round"] for r in records(stopped_run.path)] == [0, 1, 2, 3, 4]


def test_a_resumed_run_stops_at_the_same_round_as_the_uninterrupted_one(
        stopped_run, tmp_path, monkeypatch):
    """Interrupted right after round 2's checkpoint (its best round, no count yet): the
    resumed run replays rounds 1-2 and stops after round 4 with the same model and records."""
    write = Checkpointer.__call__

    def interrupt_after_round_2(self, rnd, arrays, stateful=False):
        write(self, rnd, arrays, stateful)
        if rnd == 2:
            raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(Checkpointer, "__call__", interrupt_after_round_2)
    out = tmp_path / "killed"
    with pytest.raises(Interrupted):
        fedsim.run("scenarios/quickstart.toml", ON_TRAIN_LOSS, out=out)
    monkeypatch.undo()
    assert [r["round"] for r in records(out)] == [0, 1, 2] and not (out / "summary.json").exists()
    resumed = fedsim.resume(out)
    assert resumed.summary["resumed_from"] == [2]
    assert resumed.summary["stopped"] == stopped_run.summary["stopped"]
    assert_same_run(stopped_run.path, out)


def test_a_run_resumed_from_its_stopping_round_ends_without_training(stopped_run, tmp_path):
    """Killed between round 4's checkpoint and its summary: nothing is left to train."""
    import shutil

    out = tmp_path / "late"
    shutil.copytree(stopped_run.path, out)
    for name in ("summary.json", "model.pt", "learning_curves.png"):
        (out / name).unlink()
    resumed = fedsim.resume(out)
    assert resumed.summary["resumed_from"] == [4]
    assert_same_run(stopped_run.path, out)


def test_a_sweep_sees_stopped_cells_as_finished_at_their_last_round(tmp_path):
    claim = ('claims=[{name = "gn vs ln", a = {"model.norm" = "gn"}, '
             'b = {"model.norm" = "ln"}}]')
    sweep = ["server.rounds=4", "partition.num_clients=4", "server.clients_per_round=2",
             "model.width=8", "server.early_stop.metric=train_loss",
             "server.early_stop.patience=1", "server.early_stop.min_delta=10",
             'sweep.model.norm=["gn","ln"]', "sweep.seed=[0,1]", claim]
    out = tmp_path / "s"
    result = run_sweep("scenarios/quickstart.toml", sweep, out=out)
    assert len(result.ran) == 4
    report = json.loads((out / "report.json").read_text())
    assert len(report["rows"]) == 4  # every stopped cell counts as finished
    (c,) = report["claims"]
    assert c["n_pairs"] == 2 and c["missing"] == []
    for pair in c["pairs"]:  # read at each cell's last round: round 2 of 4
        summary = json.loads((out / pair["a"] / "summary.json").read_text())
        assert summary["final"]["round"] == 2 and pair["a_value"] == \
            summary["final"]["global_test_accuracy"]
    with open(out / "cells.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:4] == ["cell", "model.norm", "seed", "round"]
    assert len(rows) == 4 * 3  # rounds 0, 1, 2 of each cell
    assert {r["cell"] for r in rows if r["stopped"]} == set(result.ran)
    with open(out / "claims.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["name"] == "gn vs ln" and row["a.model.norm"] == "gn"
    assert float(row["diff_mean"]) == c["diff_mean"] and row["verdict"] == c["verdict"]
