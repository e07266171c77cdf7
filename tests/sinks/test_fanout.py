"""RunSinks: every sink hears the run in order; one that fails is switched off with one line
and never costs the run its folder; bad sink names and missing packages are refused first."""

import json

import pytest

import fedsim
import fedsim.server.app
from fedsim.cli import main
from fedsim.sinks import Sink

TINY = ["server.rounds=2", "partition.num_clients=4", "server.clients_per_round=2",
        "partition.holdout_clients=0.0", "model.width=8"]
RESULTS = ("scenario.toml", "rounds.jsonl", "rounds.csv", "summary.json", "model.pt",
           "learning_curves.png")


class Recorder(Sink):
    name = "recorder"

    def __init__(self):
        self.calls = []

    def start(self, run):
        self.calls.append(("start", run.scenario.server.rounds, run.resumed_round))

    def on_round(self, record):
        self.calls.append(("round", record))

    def end(self, result):
        self.calls.append(("end", result.summary, [p.name for p in result.artifacts()]))

    def error(self, exc):
        self.calls.append(("error", exc))


class Boom(Sink):
    name = "boom"

    def __init__(self, when):
        self.when = when

    def on_round(self, record):
        if self.when == "round" and record["round"] == 1:
            raise RuntimeError("boom")

    def end(self, result):
        if self.when == "end":
            raise OSError("disk said no")


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def test_every_sink_hears_start_each_round_as_written_and_the_end(tmp_path):
    rec = Recorder()
    result = fedsim.run("scenarios/quickstart.toml", TINY, out=tmp_path / "r", sinks=[rec])
    written = [json.loads(line) for line in (result.path / "rounds.jsonl").read_text()
               .splitlines()]
    assert rec.calls[0] == ("start", 2, None)
    assert [c[1] for c in rec.calls if c[0] == "round"] == written  # derived fields included
    kind, summary, artifacts = rec.calls[-1]
    assert kind == "end" and summary == result.summary
    assert set(RESULTS) <= set(artifacts) and "checkpoint.pt" not in artifacts


@pytest.mark.parametrize(("when", "where"), [("round", "at round 1"), ("end", "at the end")])
def test_a_failing_sink_is_switched_off_with_one_line_and_the_folder_stays_complete(
        tmp_path, capsys, when, where):
    rec = Recorder()
    result = fedsim.run("scenarios/quickstart.toml", TINY, out=tmp_path / "r",
                        sinks=[Boom(when), rec])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"warning: the boom sink failed {where} (")
    assert "switched off" in err[0] and str(result.path) in err[0]
    assert all((result.path / name).is_file() for name in RESULTS)
    assert [c[0] for c in rec.calls].count("round") == 3 and rec.calls[-1][0] == "end"
    why = "RuntimeError: boom" if when == "round" else "OSError: disk said no"
    summary = json.loads((result.path / "summary.json").read_text())
    assert summary["sink_failures"] == {"boom": f"{where}: {why}"}
    assert summary["final"]["round"] == 2


def test_a_tracker_that_cannot_write_warns_and_the_run_exits_0(tmp_path, capsys):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where TensorBoard wants a folder")
    out = tmp_path / "r"
    code = main(["run", "scenarios/quickstart.toml", *sets(TINY), "--out", str(out), "--quiet",
                 "--set", 'output.sinks=["tensorboard"]',
                 "--set", f"output.tensorboard_dir={json.dumps(str(blocked))}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0 and len(err) == 1
    assert err[0].startswith("warning: the tensorboard sink failed at the start (")
    assert all((out / name).is_file() for name in RESULTS)
    assert "tensorboard" in json.loads((out / "summary.json").read_text())["sink_failures"]


def test_sinks_hear_a_run_that_raises(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("the engine died")

    monkeypatch.setattr(fedsim.server.app, "run_rounds", crash)
    rec = Recorder()
    with pytest.raises(RuntimeError, match="the engine died"):
        fedsim.run("scenarios/quickstart.toml", TINY, out=tmp_path / "r", sinks=[rec])
    assert rec.calls[-1][0] == "error" and str(rec.calls[-1][1]) == "the engine died"


def test_a_missing_tracker_package_is_an_error_naming_the_extra(tmp_path, capsys,
                                                                monkeypatch):
    import fedsim.sinks.base as base

    real = base.importlib.util.find_spec
    monkeypatch.setattr(base.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "r"
    code = main(["run", "scenarios/quickstart.toml", *sets(TINY), "--out", str(out),
                 "--set", 'output.sinks=["tensorboard", "wandb"]'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        "error: output.sinks names 'wandb', which needs the wandb package: pip install "
        "'fedsim[trackers]' (or drop 'wandb' from output.sinks)"]
    assert not out.exists()


def test_an_unknown_sink_is_refused_with_the_valid_names(tmp_path, capsys):
    code = main(["run", "scenarios/quickstart.toml", "--out", str(tmp_path / "r"),
                 "--set", 'output.sinks=["tensorbord"]'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: unknown sink in output.sinks = 'tensorbord' (did you mean "
                             "'tensorboard'?); choose one of: csv, mlflow, parquet, "
                             "tensorboard, wandb")


class SeesSummary(Sink):
    """Notes whether summary.json was there when it ended."""

    def __init__(self, writes_folder):
        self.writes_folder = writes_folder
        self.name = f"sees summary ({writes_folder})"
        self.saw = None

    def end(self, result):
        self.saw = (result.folder / "summary.json").is_file()


def test_sinks_writing_the_folder_end_before_summary_json_and_trackers_after(tmp_path):
    """summary.json marks a run finished (--resume refuses it, a sweep skips it): the folder's
    tables are written before it, and trackers copy the finished folder."""
    table, tracker = SeesSummary(True), SeesSummary(False)
    fedsim.run("scenarios/quickstart.toml", TINY, out=tmp_path / "r", sinks=[tracker, table])
    assert (table.saw, tracker.saw) == (False, True)


class CannotWrite(Sink):
    """A sink whose file in the results folder cannot be written (a full disk)."""

    name = "cannot write"

    def start(self, run):
        import errno

        from fedsim.errors import ResultsNotWritten

        raise ResultsNotWritten(run.folder / "trackers.json",
                                OSError(errno.ENOSPC, "No space left on device"))


def test_a_results_file_a_sink_cannot_write_fails_the_run_not_the_sink(tmp_path):
    """A failed write into the results folder is the run's, whichever part wrote: it is
    raised (the CLI's one error: line, exit 3), not switched off with a warning, and the
    sinks already started hear the error."""
    from fedsim.errors import ResultsNotWritten

    rec = Recorder()
    out = tmp_path / "r"
    with pytest.raises(ResultsNotWritten, match="could not write .*trackers.json: No space"):
        fedsim.run("scenarios/quickstart.toml", TINY, out=out, sinks=[rec, CannotWrite()])
    assert [c[0] for c in rec.calls] == ["start", "error"]
    assert not (out / "summary.json").exists()
