"""Faults end in one line: a write that fails (full disk, read-only, vanished or forbidden
folder) ends the command with one ``error:`` line naming the file, what was kept and the
command that goes on, exit 3, no traceback; and that command finishes the work exactly.

:data:`WRITE_SITES` lists every call in ``fedsim/`` that writes a file or folder, each with the
fault case here that makes it fail (or why it has none); a test checks the list against the
source, so a write site added later cannot escape it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faults import Fault  # tests/faults.py
from same_run import assert_same_run  # tests/same_run.py

from fedsim.cli import main
from fedsim.errors import EXIT_NOT_WRITTEN, ResultsNotWritten
from fedsim.lock import LOCK_NAME, held_folders

ROOT = Path(__file__).resolve().parents[2]
TINY = ["server.rounds=2", "partition.num_clients=6", "server.clients_per_round=3",
        "partition.holdout_clients=0.0", "client.epochs=1", "model.width=8"]
STATEFUL = TINY + ["server.strategy=tests/resilience/stateful_strategy.py:StatefulFedAvg"]


def sets(overrides):
    return [a for s in overrides for a in ("--set", s)]


def run_argv(out: Path, overrides=TINY) -> list[str]:
    return ["run", "scenarios/quickstart.toml", *sets(overrides), "--out", str(out), "--quiet"]


def one_line(capsys) -> str:
    """The one ``error:`` line the command printed (stderr holds nothing else)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def follow(line: str) -> int:
    """Run the command a line ends with (``...: fedsim ARGS``), quietly."""
    argv = shlex.split(re.split(r"(?:resume with|start it again with|run it again): ",
                                line)[-1])
    assert argv[0] == "fedsim", line
    if argv[1] in ("run", "sweep"):
        argv.append("--quiet")
    return main(argv[1:])


def assert_clean(folder: Path) -> None:
    """No lock held or left, no temporary file left behind in ``folder``."""
    assert held_folders() == []
    if folder.is_dir():
        left = [p.name for p in folder.rglob("*") if p.name == LOCK_NAME
                or (p.name.startswith(".") and p.name.endswith(".tmp"))]
        assert left == []


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "r"
    assert main(run_argv(out)) == 0
    return out


@pytest.fixture(scope="module")
def ref_stateful(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "r"
    assert main(run_argv(out, STATEFUL)) == 0
    return out


# ------------------------------------------------------------------ fedsim run, every site

#: a run's write sites: fault (name, how, nth, op) and what the line must say was kept
#: (``round k``: resume from the checkpoint of round k; None: start again). A tiny run
#: writes rounds.jsonl through: 1 its creation, 2 round 0, 3 the checkpoint's sync, 4
#: round 1, 5 sync, ...; checkpoint.pt at rounds 0, 1, 2.
RUN_FAULTS = {
    "scenario.toml": (("scenario.toml", "ENOSPC"), None),
    "rounds.jsonl-create": (("rounds.jsonl", "ENOSPC", 1), None),
    "rounds.jsonl-append": (("rounds.jsonl", "ENOSPC", 4), 0),
    "rounds.jsonl-sync": (("rounds.jsonl", "EROFS", 5), 0),
    "checkpoint.pt": (("checkpoint.pt", "ENOSPC", 2), 0),
    "checkpoint.pt-EACCES": (("checkpoint.pt", "EACCES", 3), 1),
    "checkpoint.prev.pt": (("checkpoint.prev.pt", "ENOSPC", 1, "link"), 0),
    "model.pt": (("model.pt", "ENOSPC"), 2),
    "learning_curves.png": (("learning_curves.png", "ENOSPC"), 2),
    "rounds.csv": (("rounds.csv", "ENOSPC"), 2),
    "summary.json": (("summary.json", "ENOSPC"), 2),
    "folder-mkdir": (("r", "EACCES", 1, "mkdir"), None),
    "lock-file": ((LOCK_NAME, "EROFS"), None),
    "folder-gone": (("rounds.jsonl", "ENOENT", 4), None),
}


@pytest.mark.slow
@pytest.mark.parametrize("site", list(RUN_FAULTS))
def test_a_failed_write_in_a_run_ends_in_one_line_that_is_true(site, ref, tmp_path, capsys,
                                                              monkeypatch):
    (name, how, *where), kept = RUN_FAULTS[site]
    out = tmp_path / "r"
    fault = Fault(name, how, *where, gone=out).install(monkeypatch)
    assert main(run_argv(out)) == EXIT_NOT_WRITTEN
    monkeypatch.undo()
    assert fault.fired
    line = one_line(capsys)
    assert f"could not write {out}" in line and f"({how})" in line, line
    assert_clean(out)
    assert not (out / "summary.json").exists()
    if kept is None:
        assert "resume with" not in line and "start it again with: fedsim run " in line, line
    else:
        assert (f"kept: round {kept} of 2 complete, checkpoint in {out}; then resume with: "
                f"fedsim run --resume {out}") in line, line
    assert follow(line) == 0
    assert_same_run(ref, out)
    if kept is not None:
        assert json.loads((out / "summary.json").read_text())["resumed_from"] == [kept]
    assert_clean(out)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failed_write_under_flowers_ray_engine_ends_in_one_line(tmp_path, capsys,
                                                                  monkeypatch):
    """Flower runs the ServerApp in a thread of its own there, and raises what it raised in
    the caller once the simulation has stopped: the same line as in-process."""
    from fedsim.checkpoint import read_checkpoint

    out = tmp_path / "r"
    Fault("checkpoint.pt", "ENOSPC", 2).install(monkeypatch)
    assert main(run_argv(out, [*TINY, "engine.kind=ray"])) == EXIT_NOT_WRITTEN
    monkeypatch.undo()
    err = capsys.readouterr().err  # Flower and Ray print notices of their own first
    assert "Traceback" not in err and err.count("error: ") == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: could not write {out / 'checkpoint.pt'}: No space left")
    assert line.endswith(f"kept: round 0 of 2 complete, checkpoint in {out}; then resume "
                         f"with: fedsim run --resume {out}"), line
    assert read_checkpoint(out / "checkpoint.pt").round == 0
    assert_clean(out)


@pytest.mark.slow
def test_a_failed_write_while_resuming_keeps_the_checkpoint(ref, tmp_path, capsys,
                                                            monkeypatch):
    """--resume cuts rounds.jsonl back to its checkpoint (a write): refused there, the
    folder still resumes; so with a lock file it cannot create (a read-only folder)."""
    out = tmp_path / "r"
    Fault("checkpoint.pt", "ENOSPC", 2).install(monkeypatch)
    assert main(run_argv(out)) == EXIT_NOT_WRITTEN
    monkeypatch.undo()
    capsys.readouterr()
    for fault in (Fault("rounds.jsonl", "EROFS"), Fault(LOCK_NAME, "EROFS")):
        fault.install(monkeypatch)
        assert main(["run", "--resume", str(out), "--quiet"]) == EXIT_NOT_WRITTEN
        monkeypatch.undo()
        assert fault.fired
        line = one_line(capsys)
        assert line.endswith(f"kept: round 0 of 2 complete, checkpoint in {out}; then resume "
                             f"with: fedsim run --resume {out}"), line
        assert_clean(out)
    assert follow(line) == 0
    assert_same_run(ref, out)


@pytest.mark.slow
def test_a_folder_removed_while_resuming_is_named_as_gone(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    Fault("checkpoint.pt", "ENOSPC", 2).install(monkeypatch)
    assert main(run_argv(out)) == EXIT_NOT_WRITTEN
    monkeypatch.undo()
    capsys.readouterr()
    Fault("rounds.jsonl", "ENOENT", 2, gone=out).install(monkeypatch)  # round 1's record
    assert main(["run", "--resume", str(out), "--quiet"]) == EXIT_NOT_WRITTEN
    monkeypatch.undo()
    line = one_line(capsys)
    assert line.endswith(f"(ENOENT): the folder is gone (removed while the command ran); "
                         f"{out} is gone, nothing to resume; then start the run again with: "
                         f"fedsim run FILE --out {out}"), line
    assert held_folders() == [] and not out.exists()


@pytest.mark.slow
def test_a_damaged_checkpoint_that_cannot_be_set_aside_keeps_the_previous(
        ref, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    Fault("checkpoint.pt", "ENOSPC", 3).install(monkeypatch)  # round 2's: round 1 kept
    assert main(run_argv(out)) == EXIT_NOT_WRITTEN
    monkeypatch.undo()
    capsys.readouterr()
    (out / "checkpoint.pt").unlink()  # a link of checkpoint.prev.pt (round 1 too): replaced
    (out / "checkpoint.pt").write_bytes(b"damaged")
    Fault("checkpoint.bad.pt", "EROFS", 1, "replace").install(monkeypatch)
    assert main(["run", "--resume", str(out), "--quiet"]) == EXIT_NOT_WRITTEN
    monkeypatch.undo()
    warning, line = capsys.readouterr().err.strip().splitlines()  # the damage, then the fault
    assert warning.startswith(f"warning: {out / 'checkpoint.pt'}: cannot be read"), warning
    assert line.startswith("error: "), line
    assert f"could not write {out / 'checkpoint.bad.pt'}" in line
    assert "kept: round 1 of 2 complete" in line, line
    assert follow(line) == 0
    assert (out / "checkpoint.bad.pt").read_bytes() == b"damaged"
    assert_same_run(ref, out)


@pytest.mark.slow
@pytest.mark.parametrize("writes_ok, kept", [(0, 0), (7, 1)],
                         ids=["journal-create", "journal-append"])
def test_a_failed_write_of_the_client_state_journal_keeps_the_checkpoint_before(
        writes_ok, kept, ref_stateful, tmp_path, capsys, monkeypatch):
    """The journal starts at round 1's checkpoint (no client holds state before): its magic,
    then a header and a state for each of the round's 3 clients; round 2 appends."""
    out = tmp_path / "r"
    fault = Fault("client_states.0.log", "ENOSPC", writes_ok=writes_ok).install(monkeypatch)
    assert main(run_argv(out, STATEFUL)) == EXIT_NOT_WRITTEN
    monkeypatch.undo()
    assert fault.fired
    line = one_line(capsys)
    assert f"could not write {out / 'client_states.0.log'}" in line, line
    assert f"kept: round {kept} of 2 complete" in line, line
    assert follow(line) == 0
    assert_same_run(ref_stateful, out)


@pytest.mark.slow
def test_a_full_disk_while_spilling_client_states_ends_in_one_line(ref_stateful, tmp_path,
                                                                   capsys, monkeypatch):
    out = tmp_path / "r"
    Fault("states.bin", "ENOSPC").install(monkeypatch)
    argv = run_argv(out, [*STATEFUL, "engine.state_memory_mb=0",
                          f"engine.state_dir={tmp_path / 'spill'}"])
    assert main(argv) == EXIT_NOT_WRITTEN
    monkeypatch.undo()
    line = one_line(capsys)
    assert f"could not write {tmp_path / 'spill'}" in line and "states.bin" in line, line
    assert "kept: round 0 of 2 complete" in line, line


# ------------------------------------------------------------- sweeps, reports, partitions

SWEEP = ["sweep", "scenarios/quickstart.toml", *sets(TINY), "--set", "sweep.seed=[0,1]",
         "--quiet"]


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "s"
    assert main([*SWEEP, "--out", str(out)]) == 0
    return out


#: the sweep folder's own writes, on a sweep whose cells are all finished (nothing trains)
SWEEP_FAULTS = {
    "sweep-mkdir": ("s", "EACCES", 1, "mkdir"),
    "sweep-scenario.toml": ("scenario.toml", "ENOSPC"),
    "sweep.json": ("sweep.json", "ENOSPC"),
    "report.md": ("report.md", "ENOSPC"),
    "report.json": ("report.json", "EROFS"),
    "accuracy.png": ("accuracy.png", "ENOSPC"),
    "sweep-learning_curves.png": ("learning_curves.png", "ENOSPC"),
    "cells.csv": ("cells.csv", "ENOSPC"),
    "claims.csv": ("claims.csv", "EROFS"),
    "sweep-overwrite": ("seed-1", "EROFS", 1, "replace"),
}


@pytest.mark.slow
@pytest.mark.parametrize("site", list(SWEEP_FAULTS))
def test_a_failed_write_of_a_sweep_folder_ends_in_one_line_that_is_true(
        site, finished_sweep, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    if site != "sweep-mkdir":
        shutil.copytree(finished_sweep, out)
    argv = [*SWEEP, "--out", str(out), *(["--overwrite"] if site == "sweep-overwrite" else [])]
    fault = Fault(*SWEEP_FAULTS[site]).install(monkeypatch)
    assert main(argv) == EXIT_NOT_WRITTEN
    monkeypatch.undo()
    assert fault.fired
    line = one_line(capsys)
    assert f"could not write {out}" in line, line
    assert_clean(out)
    done = {"sweep-mkdir": 0, "sweep-overwrite": 1}.get(site, 2)  # overwrite removed one
    assert f"kept: {done} of 2 cells done" in line, line
    assert "--overwrite" not in line.split("resume with:")[1]
    assert follow(line) == 0
    assert (out / "report.md").is_file()
    for cell in ("seed-0", "seed-1"):
        assert_same_run(finished_sweep / cell, out / cell)


@pytest.mark.slow
def test_a_failed_write_in_a_sweep_cell_names_the_cell(finished_sweep, tmp_path, capsys,
                                                       monkeypatch):
    out = tmp_path / "s"
    Fault("checkpoint.pt", "ENOSPC", 2).install(monkeypatch)  # seed-0's round 1
    assert main([*SWEEP, "--out", str(out)]) == EXIT_NOT_WRITTEN
    monkeypatch.undo()
    line = one_line(capsys)
    assert line.startswith(f"error: sweep cell seed-0: could not write {out / 'seed-0'}"), line
    assert ("kept: 0 of 2 cells done; stopped: seed-0 at round 0 of 2; 1 not started "
            f"(in {out}); then resume with: fedsim sweep") in line, line
    assert_clean(out)
    assert follow(line) == 0
    for cell in ("seed-0", "seed-1"):
        assert_same_run(finished_sweep / cell, out / cell)


REPORT_FAULTS = {
    "runs.json": ("runs.json", "ENOSPC"),
    "compare-report.md": ("report.md", "ENOSPC"),
    "compare-overwrite": ("old.txt", "EACCES", 1, "replace"),
}


@pytest.mark.slow
@pytest.mark.parametrize("site", list(REPORT_FAULTS))
def test_a_failed_write_of_a_comparison_ends_in_one_line(site, finished_sweep, tmp_path,
                                                         capsys, monkeypatch):
    out = tmp_path / "cmp"
    argv = ["report", str(finished_sweep / "seed-0"), str(finished_sweep / "seed-1"),
            "--out", str(out)]
    if site == "compare-overwrite":
        out.mkdir()
        (out / "old.txt").write_text("an earlier report")
        argv.append("--overwrite")
    fault = Fault(*REPORT_FAULTS[site]).install(monkeypatch)
    assert main(argv) == EXIT_NOT_WRITTEN
    monkeypatch.undo()
    assert fault.fired
    line = one_line(capsys)
    assert f"could not write {out}" in line and "the runs it reads are untouched" in line
    assert line.endswith(shlex.join(["fedsim", *argv[:5], "--overwrite"])), line
    assert_clean(out)
    assert follow(line) == 0
    assert json.loads((out / "runs.json").read_text())[0]["name"].endswith("seed-0")


@pytest.mark.slow
def test_a_failed_write_of_a_partition_heat_map_ends_in_one_line(tmp_path, capsys,
                                                                 monkeypatch):
    png = tmp_path / "p.png"
    argv = ["partitions", "scenarios/quickstart.toml", *sets(TINY), "--png", str(png)]
    Fault("p.png", "ENOSPC").install(monkeypatch)
    assert main(argv) == EXIT_NOT_WRITTEN
    monkeypatch.undo()
    line = one_line(capsys)
    assert line.startswith(f"error: could not write {png}: No space left on device (ENOSPC)")
    assert line.endswith("nothing was written; then run it again: " + shlex.join(
        ["fedsim", *argv])), line
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ the library's own writers


def _roc(path):
    from fedsim.privacy.metrics import plot_roc

    plot_roc({"loss": ([0.0, 0.5, 1.0], [0.0, 0.7, 1.0], 0.6)}, path)


def _grid(path):
    from fedsim.privacy.inversion import save_image_grid

    save_image_grid(torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4), path)


def _mia_curve(path):
    from fedsim.report.report import NORM, SEED, mia_vs_accuracy_plot

    rounds = [{"global_test_accuracy": a, "loss": {"auc": 0.5 + a / 10}} for a in (0.2, 0.4)]
    row = {NORM: "gn", SEED: 0, "params": {NORM: "gn", SEED: 0}, "mia_by_round": rounds}
    mia_vs_accuracy_plot([row], "loss", path, None)


def _forest(path):
    from fedsim.report.claims import forest_plot
    from fedsim.report.report import _pyplot

    claim = {"name": "gn beats bn", "diff_mean": 0.1, "ci_low": 0.0, "ci_high": 0.2,
             "verdict": "supported", "settings": []}
    forest_plot([claim], path, _pyplot)


def _journals(path):
    from fedsim.state_journal import StateJournal, remove_other_journals

    StateJournal(path.parent, 0).close()
    remove_other_journals(path.parent, keep=set())


def _tracker_ids(path):
    from fedsim.sinks.ids import write_ids

    write_ids(path.parent, "mlflow", {"run_id": "0"})


def _parquet(path):
    from fedsim.sinks.tables import write_table

    write_table([{"round": 0, "global_test_accuracy": 0.1}], path, "parquet")


def _lock_info(path):
    from fedsim.lock import hold

    with hold(path.parent, "a test"):
        pass


#: writers a run or sweep reaches only in a setting too slow for the tests above (a privacy
#: audit, a sweep with privacy rounds or claims, a new journal generation, a tracker's run
#: ids, a parquet table) or through a primitive the fault does not intercept (the lock
#: file's content), each made to fail here; a sink raising ResultsNotWritten fails the run,
#: not the sink: tests/sinks/test_fanout.py
UNIT_FAULTS = {
    "privacy_roc.png": (_roc, Fault("privacy_roc.png", "ENOSPC")),
    "privacy_inversion.png": (_grid, Fault("privacy_inversion.png", "ENOSPC")),
    "mia_vs_accuracy.png": (_mia_curve, Fault("mia_vs_accuracy.png", "ENOSPC")),
    "claims.png": (_forest, Fault("claims.png", "ENOSPC")),
    "trackers.json": (_tracker_ids, Fault("trackers.json", "ENOSPC")),
    "rounds.parquet": (_parquet, Fault("rounds.parquet", "ENOSPC")),
    "client_states.0.log-remove": (_journals, Fault("client_states.0.log", "EROFS", 1,
                                                    "unlink")),
    "lock-info": (_lock_info, None),
}


@pytest.mark.parametrize("site", list(UNIT_FAULTS))
def test_each_writer_fails_as_results_not_written_naming_its_file(site, tmp_path,
                                                                  monkeypatch):
    write, fault = UNIT_FAULTS[site]
    name = site.removesuffix("-remove")
    path = tmp_path / ("x" if site == "lock-info" else name)
    if fault is None:  # the lock file's content is written with os.pwrite
        monkeypatch.setattr(os, "pwrite", lambda *a: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
        name = LOCK_NAME
    else:
        fault.install(monkeypatch)
    with pytest.raises(ResultsNotWritten) as err:
        write(path)
    monkeypatch.undo()
    assert err.value.path == str(tmp_path / name)
    assert err.value.errno in (errno.ENOSPC, errno.EROFS)
    assert f"could not write {tmp_path / name}: " in str(err.value)
    assert_clean(tmp_path)
    assert not (tmp_path / name).exists() or site.endswith("-remove")


def test_results_not_written_crosses_process_boundaries_with_its_cell():
    import pickle

    exc = ResultsNotWritten("/r/checkpoint.pt", OSError(errno.ENOSPC, "No space left on device"))
    exc.cell = "seed-0"
    back = pickle.loads(pickle.dumps(exc))
    assert (back.path, back.errno, back.cell, str(back)) == (exc.path, exc.errno, "seed-0",
                                                             str(exc))
    assert str(back) == ("sweep cell seed-0: could not write /r/checkpoint.pt: No space left "
                         "on device (ENOSPC): the disk is full; free space there")


# ------------------------------------------------------ every write site has its fault case

EXEMPT = "exempt"
#: every call in fedsim/ that writes (the pattern below finds them): (module, a fragment of
#: its line, the fault case above that makes it fail, or why it has none)
WRITE_SITES = [
    ("fedsim/checkpoint.py", "keep_copy(latest", "checkpoint.prev.pt"),
    ("fedsim/checkpoint.py", "save_torch(payload", "checkpoint.pt"),
    ("fedsim/checkpoint.py", "os.replace(latest, folder / BAD)", "checkpoint.bad.pt"),
    ("fedsim/data/report.py", "make_folder(path.parent)", "partitions"),
    ("fedsim/data/report.py", "save_figure(fig, path", "partitions"),
    ("fedsim/engine/store.py", "make_folder(parent)", "spill"),
    ("fedsim/engine/store.py", "os.open(self._dir", "spill"),
    ("fedsim/engine/store.py", "os.pwrite(self._fd", "spill"),
    ("fedsim/engine/store.py", "shutil.rmtree(self._dir", EXEMPT + ": removes its own "
     "temporary spill folder at the end, errors ignored"),
    ("fedsim/engine/deploy.py", "self.workdir.mkdir", EXEMPT + ": the Deployment Engine's "
     "private work folder (logs, Flower's config), not results"),
    ("fedsim/engine/deploy.py", 'open(self.workdir / f"{name}.log"', EXEMPT + ": same"),
    ("fedsim/engine/deploy.py", "self.flwr_home.mkdir", EXEMPT + ": same"),
    ("fedsim/engine/deploy.py", 'write_text(self.flwr_home / "config.toml"', EXEMPT + ": same"),
    ("fedsim/engine/deploy.py", "shutil.rmtree(self.workdir", EXEMPT + ": same"),
    ("fedsim/engine/known_nodes.py", "write_text(path", EXEMPT + ": same (node-partitions)"),
    ("fedsim/lock.py", "os.open(path", "lock-file"),
    ("fedsim/lock.py", "os.ftruncate(fd, 0)", "lock-info"),
    ("fedsim/lock.py", "os.pwrite(fd", "lock-info"),
    ("fedsim/lock.py", "path.unlink()", EXEMPT + ": the lock file removed on release, errors "
     "ignored (an unlocked lock file is harmless)"),
    ("fedsim/lock.py", "make_folder(folder)", "folder-mkdir"),
    ("fedsim/lock.py", "shutil.rmtree(trash)", "sweep-overwrite"),
    ("fedsim/lock.py", "trash.mkdir()", "sweep-overwrite"),
    ("fedsim/lock.py", "os.replace(entry, trash / entry.name)", "sweep-overwrite"),
    ("fedsim/lock.py", "shutil.rmtree(trash, ignore_errors=True)", EXEMPT + ": deletes what "
     "a failed clear moved aside, errors ignored (the next line reports them)"),
    ("fedsim/lock.py", "shutil.rmtree(trash)", "compare-overwrite"),
    ("fedsim/privacy/inversion.py", "make_folder(path.parent)", "privacy_inversion.png"),
    ("fedsim/privacy/inversion.py", "save_figure(fig, path", "privacy_inversion.png"),
    ("fedsim/privacy/metrics.py", "make_folder(path.parent)", "privacy_roc.png"),
    ("fedsim/privacy/metrics.py", "save_figure(fig, path", "privacy_roc.png"),
    ("fedsim/report/claims.py", "save_figure(fig, path", "claims.png"),
    ("fedsim/report/compare.py", "clear(out", "compare-overwrite"),
    ("fedsim/report/compare.py", 'write_json(out / "runs.json"', "runs.json"),
    ("fedsim/report/report.py", "save_figure(fig, path, dpi=110)", "accuracy.png"),
    ("fedsim/report/budget.py", "save_figure(fig, path, dpi=110)", "sweep-learning_curves.png"),
    ("fedsim/report/report.py", "save_figure(fig, path, dpi=110)", EXEMPT + ": hybrid_alpha.png "
     "(curve_plot), written by the same try/save_figure/close path as accuracy.png; a hybrid "
     "sweep to reach it costs more than this test's budget"),
    ("fedsim/report/report.py", "save_figure(fig, path, dpi=110)", "mia_vs_accuracy.png"),
    ("fedsim/report/report.py", 'write_text(path, "\\n".join(lines)', "report.md"),
    ("fedsim/report/report.py", 'write_json(root / "report.json"', "report.json"),
    ("fedsim/runner.py", "files.write_text(sinks.out / ERROR_FILE", EXEMPT + ": a failed run's "
     "traceback; a fault writing it is caught and the failure told without it "
     "(tests/engine/test_engine_failures.py)"),
    ("fedsim/sinks/folder.py", "clear(self.out", "compare-overwrite"),
    ("fedsim/sinks/folder.py", "make_folder(self.out)", EXEMPT + ": the folder exists by "
     "then (the run took its lock in it); would fail as folder-mkdir does"),
    ("fedsim/sinks/folder.py", "make_folder(self.out)", EXEMPT + ": same"),
    ("fedsim/sinks/folder.py", 'truncate(self.out / "rounds.jsonl"', "resume"),
    ("fedsim/sinks/folder.py", 'write_text(self.out / "scenario.toml"', "scenario.toml"),
    ("fedsim/sinks/folder.py", 'write_text(self.out / "rounds.jsonl"', "rounds.jsonl-create"),
    ("fedsim/sinks/folder.py", 'append_text(self.out / "rounds.jsonl"', "rounds.jsonl-append"),
    ("fedsim/sinks/folder.py", 'sync_size(self.out / "rounds.jsonl"', "rounds.jsonl-sync"),
    ("fedsim/sinks/folder.py", 'save_torch(state, self.out / "model.pt"', "model.pt"),
    ("fedsim/sinks/folder.py", 'write_json(self.out / "summary.json"', "summary.json"),
    ("fedsim/sinks/ids.py", "write_json(folder / TRACKERS_JSON", "trackers.json"),
    ("fedsim/sinks/plots.py", "save_figure(fig, path", "learning_curves.png"),
    # rounds.csv of a run, cells.csv and claims.csv of a sweep (and fedsim table): one writer
    ("fedsim/sinks/tables.py", "write_text(path, csv_text(rows", "rounds.csv"),
    ("fedsim/sinks/tables.py", "atomic_write(path, lambda fh: pq.write_table", "rounds.parquet"),
    ("fedsim/state_journal.py", 'open(self.path, "wb")', "journal-create"),
    ("fedsim/state_journal.py", "self._fh.write(MAGIC)", "journal-create"),
    ("fedsim/state_journal.py", 'open(self.path, "r+b")', "resume-journal"),
    ("fedsim/state_journal.py", "self._fh.truncate(valid_bytes)", "resume-journal"),
    ("fedsim/state_journal.py", "self._fh.write(_ENTRY.pack(int(key), -1, 0))",
     "journal-append"),
    ("fedsim/state_journal.py", "self._fh.write(_ENTRY.pack(int(key), len(data)",
     "journal-append"),
    ("fedsim/state_journal.py", "self._fh.write(data)", "journal-append"),
    ("fedsim/state_journal.py", "path.unlink(missing_ok=True)", "client_states.0.log-remove"),
    ("fedsim/sweep.py", "clear(root", "sweep-overwrite"),
    ("fedsim/sweep.py", "make_folder(root)", "sweep-mkdir"),
    ("fedsim/sweep.py", 'write_text(root / "scenario.toml"', "sweep-scenario.toml"),
    ("fedsim/sweep.py", "write_json(root / SWEEP_JSON", "sweep.json"),
]
#: the write helpers of fedsim.files and the primitives they (or a site) call
WRITE_CALL = re.compile(
    r"(?<![\w.])(write_text|write_bytes|write_json|save_torch|save_figure|atomic_write|"
    r"append_text|truncate|sync_size|make_folder|keep_copy|clear)\(|torch\.save\(|"
    r"\.savefig\(|(?<![\w.])open\([^)]*[\"'][rb]*[wax+][rwab+]*[\"']|"
    r"os\.(open|replace|rename|link|pwrite|write|ftruncate|unlink|remove|rmdir|mkdir|"
    r"makedirs)\(|shutil\.(rmtree|copy\w*|move)\(|\.(mkdir|unlink|rmdir|touch|write|"
    r"write_text|write_bytes|truncate)\(")
#: the cases that exercise a site without being a key above
COVERED_ELSEWHERE = {"partitions": "test_a_failed_write_of_a_partition_heat_map_ends_in_one_line",
                     "spill": "test_a_full_disk_while_spilling_client_states_ends_in_one_line",
                     "resume": "test_a_failed_write_while_resuming_keeps_the_checkpoint",
                     "resume-journal": "tests/resilience/test_resume.py (a journal's tail "
                                       "cut back on resume) and the journal tests below",
                     "checkpoint.bad.pt": "test_a_damaged_checkpoint_that_cannot_be_set_"
                                          "aside_keeps_the_previous",
                     "journal-create": "test_a_failed_write_of_the_client_state_journal_...",
                     "journal-append": "test_a_failed_write_of_the_client_state_journal_..."}


def write_calls() -> list[tuple[str, str]]:
    """(module, line) of every write call in fedsim/ (fedsim/files.py is where they end)."""
    files = subprocess.run(["git", "ls-files", "fedsim"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    hits = []
    for name in files:
        if not name.endswith(".py") or name == "fedsim/files.py":
            continue
        for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
            code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
            if code.lstrip().startswith("def ") or not WRITE_CALL.search(code):
                continue
            if re.search(r"\.(clear|write)\(\)", code) or "self._logs.clear" in code:
                continue  # emptying a dict or list
            hits.append((name, line.strip()))
    return hits


def test_every_write_site_in_fedsim_has_a_fault_case():
    cases = (set(RUN_FAULTS) | set(SWEEP_FAULTS) | set(REPORT_FAULTS) | set(UNIT_FAULTS)
             | set(COVERED_ELSEWHERE))
    hits = write_calls()
    assert len(hits) > 40  # the scan found the writers
    unlisted = []
    listed = list(WRITE_SITES)
    for module, line in hits:
        match = next((s for s in listed if s[0] == module and s[1] in line), None)
        if match is None:
            unlisted.append(f"{module}: {line}")
        else:
            listed.remove(match)
    assert not unlisted, ("write sites without a fault case; add each to WRITE_SITES with "
                          "the case that makes it fail:\n" + "\n".join(unlisted))
    assert not listed, f"WRITE_SITES lists writes the source no longer has: {listed}"
    for module, fragment, case in WRITE_SITES:
        assert case.startswith(EXEMPT + ": ") or case in cases, (module, fragment, case)


# ------------------------------------------------------------ a real, tiny file system


def _mount(path: Path, options: str) -> str | None:
    """Mount a tmpfs with ``options`` at ``path``; why not, or None once mounted."""
    if sys.platform != "linux":
        return "tmpfs mounts need Linux"
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (CAP_SYS_ADMIN); run as root to include it"
    if shutil.which("mount") is None:
        return "no mount command on this machine"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return f"mount -t tmpfs failed here ({done.stderr.strip() or done.returncode})"
    return None


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs (a tiny run needs ~120 KiB); skipped, saying why, where it cannot
    be mounted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    why = _mount(mnt, "size=64k")
    if why is not None:
        pytest.skip(f"no real full-disk test: {why}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_real_full_disk_then_a_read_only_one_end_in_one_line_and_the_run_resumes(
        tiny_fs, ref, capsys):
    out = tiny_fs / "r"
    assert main(run_argv(out)) == EXIT_NOT_WRITTEN
    line = one_line(capsys)
    assert line.startswith(f"error: could not write {out}/") and "(ENOSPC)" in line, line
    assert_clean(out)
    # room, then the folder turns read-only: the resume stops at once, in one line too
    subprocess.run(["mount", "-o", "remount,size=4m,ro", str(tiny_fs)], check=True)
    resume = ["run", "--resume", str(out), "--quiet"]
    assert main(resume) == EXIT_NOT_WRITTEN
    ro = one_line(capsys)
    assert f"could not write {out / LOCK_NAME}: Read-only file system (EROFS)" in ro, ro
    assert ro.endswith(f"then resume with: fedsim run --resume {out}"), ro
    subprocess.run(["mount", "-o", "remount,rw", str(tiny_fs)], check=True)
    assert main(resume) == 0
    assert_same_run(ref, out)
    assert_clean(out)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_real_full_disk_under_a_sweep_with_worker_processes_names_a_cell(tiny_fs, capsys):
    out = tiny_fs / "s"
    t0 = time.monotonic()
    assert main([*SWEEP, "--out", str(out), "--workers", "2"]) == EXIT_NOT_WRITTEN
    line = one_line(capsys)
    assert re.match(rf"error: sweep cell seed-[01]: could not write {out}/seed-[01]/", line)
    assert "(ENOSPC)" in line and "then resume with: fedsim sweep " in line, line
    assert time.monotonic() - t0 < 200
    assert_clean(out)
