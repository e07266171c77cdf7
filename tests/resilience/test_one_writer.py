"""Two writers on one folder: while a run (or sweep) writes its folder, every other command
that would write there is refused with one ``error:`` line naming the folder and the
process that holds it (exit 2) and changes nothing; the first writer ends exactly as if it
had been alone.

The first writer is a real ``fedsim`` process, stopped (SIGSTOP) once it has recorded a few
rounds so the second writer tries while it certainly holds the folder, then continued.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lock_holder import start_holder  # tests/lock_holder.py
from same_run import assert_same_run  # tests/same_run.py

from fedsim.cli import main
from fedsim.errors import ScenarioError
from fedsim.lock import LOCK_NAME, held_folders

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["server.rounds=12", "partition.num_clients=12", "server.clients_per_round=3",
         "partition.holdout_clients=0.0", "client.epochs=1", "model.width=8"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # one torch thread, as
# in this process (tests/conftest.py): runs here and there then agree bitwise


def sets(overrides):
    return [a for s in overrides for a in ("--set", s)]


def start(argv: list[str]) -> subprocess.Popen:
    """``fedsim ARGV`` in a session of its own (its process group: it and its workers)."""
    return subprocess.Popen([sys.executable, "-m", "fedsim.cli", *argv], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def stop_when(proc: subprocess.Popen, files: list[Path], lines: int) -> None:
    """SIGSTOP ``proc``'s process group once every file in ``files`` has ``lines`` lines."""
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and proc.poll() is None:
        if all(f.exists() and f.read_text().count("\n") >= lines for f in files):
            os.killpg(proc.pid, signal.SIGSTOP)
            return
        time.sleep(0.005)
    raise AssertionError(f"{files} did not reach {lines} lines: {proc.communicate()}")


def finish(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def refused(argv: list[str], capsys, folder: Path, pid: int, what: str) -> None:
    """``fedsim ARGV`` exits 2 with the one line naming ``folder`` and its holder."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert f"{str(folder)!r} is being written by another fedsim process, pid {pid} ({what}" \
        in err, err
    assert held_folders() == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_writer_of_a_run_folder_is_refused_and_the_first_is_unaffected(
        tmp_path, capsys):
    ref = tmp_path / "ref"
    assert main(["run", "scenarios/quickstart.toml", *sets(SMALL), "--out", str(ref),
                 "--quiet"]) == 0
    other = tmp_path / "other"
    shutil.copytree(ref, other)
    out = tmp_path / "r"
    first = start(["run", "scenarios/quickstart.toml", *sets(SMALL), "--out", str(out),
                   "--quiet"])
    try:
        stop_when(first, [out / "rounds.jsonl"], 3)
        before = snapshot(out)
        what = "fedsim run: "
        for argv in (["run", "scenarios/quickstart.toml", "--out", str(out)],
                     ["run", "scenarios/quickstart.toml", "--out", str(out), "--overwrite"],
                     ["run", "--resume", str(out)],
                     ["report", str(ref), str(other), "--out", str(out), "--overwrite"]):
            refused(argv, capsys, out, first.pid, what)
        assert snapshot(out) == before  # the refused writers touched nothing
    finally:
        finish(first)
    assert_same_run(ref, out)
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_writer_of_a_sweep_or_of_its_cells_is_refused(tmp_path, capsys):
    sweep = ["sweep", "scenarios/quickstart.toml", *sets(SMALL), "--set", "sweep.seed=[0,1]",
             "--quiet"]
    ref = tmp_path / "ref"
    assert main([*sweep, "--out", str(ref)]) == 0
    out = tmp_path / "s"
    first = start([*sweep, "--out", str(out), "--workers", "2"])
    cells = [out / "seed-0", out / "seed-1"]
    try:
        stop_when(first, [c / "rounds.jsonl" for c in cells], 3)  # both workers run a cell
        refused([*sweep, "--out", str(out)], capsys, out, first.pid, "fedsim sweep")
        for cell in cells:  # each is held by the worker process running it
            worker = json.loads((cell / LOCK_NAME).read_text())["pid"]
            assert worker != first.pid
            what = f"a cell of the fedsim sweep in pid {first.pid}"
            refused(["run", "--resume", str(cell)], capsys, cell, worker, what)
            refused(["run", "scenarios/quickstart.toml", "--out", str(cell), "--overwrite"],
                    capsys, cell, worker, what)
    finally:
        finish(first)
    for cell in ("seed-0", "seed-1"):
        assert_same_run(ref / cell, out / cell)
    assert not list(out.rglob(LOCK_NAME))


@pytest.mark.timeout(60)
def test_a_deployed_run_into_a_folder_another_process_writes_is_refused_at_once(tmp_path):
    from fedsim.engine.deploy import run_deployed

    proc = start_holder(tmp_path)
    try:
        with pytest.raises(ScenarioError, match=f"pid {proc.pid}"):
            run_deployed(ROOT / "scenarios/quickstart.toml", tmp_path)  # before any process
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(60)
def test_rebuilding_a_report_in_a_sweep_folder_another_process_writes_is_refused(tmp_path,
                                                                                 capsys):
    (tmp_path / "sweep.json").write_text('{"cells": []}')
    proc = start_holder(tmp_path)
    try:
        refused(["report", str(tmp_path)], capsys, tmp_path, proc.pid, "a test's holder")
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME, "sweep.json"]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(60)
def test_rebuilding_tables_in_a_folder_another_process_writes_is_refused(tmp_path, capsys):
    """``fedsim table`` writes into the folder it reads (no --out): it takes the lock too;
    with --out FILE it writes elsewhere and reads a running folder as it stands."""
    (tmp_path / "rounds.jsonl").write_text('{"round": 0, "global_test_accuracy": 0.1}\n')
    proc = start_holder(tmp_path)
    try:
        refused(["table", str(tmp_path)], capsys, tmp_path, proc.pid, "a test's holder")
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME, "rounds.jsonl"]
        out = tmp_path.parent / "elsewhere.csv"
        assert main(["table", str(tmp_path), "--out", str(out)]) == 0
        assert out.read_text() == "round,global_test_accuracy\n0,0.1\n"
    finally:
        proc.kill()
        proc.wait()
