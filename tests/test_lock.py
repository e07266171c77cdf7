"""One writer per folder: the lock is held by one process at a time, says who holds it,
is re-entrant within a process, and dies with its holder (never stale)."""

import json
import os
import signal
import sys

import pytest
from faults import Fault  # tests/faults.py
from lock_holder import start_holder  # tests/lock_holder.py

from fedsim import lock
from fedsim.errors import ScenarioError
from fedsim.lock import CLEARING, LOCK_NAME, FolderBusy, clear, held_folders, hold, is_empty


def test_hold_writes_who_holds_it_and_removes_the_file_on_release(tmp_path):
    folder = tmp_path / "new" / "r"
    with hold(folder, "fedsim run") as held:
        assert held == folder and folder.is_dir()  # made where missing
        info = json.loads((folder / LOCK_NAME).read_text())
        assert (info["pid"], info["what"]) == (os.getpid(), "fedsim run")
        assert held_folders() == [folder.resolve()]
        assert is_empty(folder)  # the lock file alone does not make a folder non-empty
    assert list(folder.iterdir()) == [] and held_folders() == []


def test_hold_of_a_missing_folder_without_create_and_of_a_file_are_errors(tmp_path):
    with pytest.raises(ScenarioError, match="no such folder"), hold(tmp_path / "x", "t",
                                                                     create=False):
        pass
    (tmp_path / "f").write_text("")
    with pytest.raises(ScenarioError, match="exists and is not a folder"), \
            hold(tmp_path / "f", "t"):
        pass
    assert not (tmp_path / "x").exists()


def test_hold_is_reentrant_within_a_process(tmp_path):
    with hold(tmp_path, "a sweep cell"), hold(tmp_path / ".", "the run inside it"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["what"] == "a sweep cell"
    assert not (tmp_path / LOCK_NAME).exists() and held_folders() == []


@pytest.mark.timeout(60)
def test_another_process_is_refused_naming_the_folder_and_its_holder(tmp_path):
    proc = start_holder(tmp_path)
    try:
        with pytest.raises(FolderBusy) as err, hold(tmp_path, "fedsim run --resume"):
            pass
        assert str(err.value).startswith(
            f"{str(tmp_path)!r} is being written by another fedsim process, pid {proc.pid} "
            f"(a test's holder: {sys.executable} -c ")
        assert str(err.value).endswith("wait for it to end (or stop it), or write elsewhere "
                                       "(--out DIR)")
        assert isinstance(err.value, ScenarioError)  # exit 2 at the command line
        assert held_folders() == []
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(60)
def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    proc = start_holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / LOCK_NAME).exists()  # its file stays, unlocked by the kernel
    with hold(tmp_path, "the next writer"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_file_removed_as_it_is_opened_is_not_held(tmp_path, monkeypatch):
    """The holder releases (removes the file) between this process's open and its flock:
    the lock of the removed file guards nothing, so the writer starts over."""
    real = lock.fcntl.flock
    calls = []

    def flock(fd, op):
        calls.append(fd)
        if len(calls) == 1:
            (tmp_path / LOCK_NAME).unlink()  # released by its holder just now
        return real(fd, op)

    monkeypatch.setattr(lock.fcntl, "flock", flock)
    with hold(tmp_path, "t"):
        fd = lock._HELD[tmp_path.resolve()][0]
        assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / LOCK_NAME))
    assert len(calls) == 2


def test_the_holder_line_escapes_control_characters(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": 7, "what": "fedsim run\nerror: forged", "command": "x\x1b[31m"}))
    assert lock.holder(tmp_path) == r"pid 7 (fedsim run\nerror: forged: x\x1b[31m)"
    (tmp_path / LOCK_NAME).write_text("")  # its holder is writing it this moment
    assert lock.holder(tmp_path) == "a process that has not yet written its pid"


def test_clear_keeps_the_lock_and_removes_everything_else(tmp_path):
    (tmp_path / "cell" / "deep").mkdir(parents=True)
    (tmp_path / "cell" / "summary.json").write_text("{}")
    (tmp_path / "report.md").write_text("")
    (tmp_path / CLEARING).mkdir()  # left by a clear that failed
    with hold(tmp_path, "fedsim sweep --overwrite"):
        clear(tmp_path, "fedsim sweep --overwrite")
        assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]
    with pytest.raises(RuntimeError, match="needs its lock held"):
        clear(tmp_path, "t")


@pytest.mark.timeout(60)
def test_clear_refuses_a_sub_folder_another_process_writes(tmp_path):
    (tmp_path / "cell").mkdir()
    (tmp_path / "report.md").write_text("")
    proc = start_holder(tmp_path / "cell")
    try:
        with hold(tmp_path, "fedsim sweep --overwrite"), \
                pytest.raises(FolderBusy, match=f"pid {proc.pid}"):
            clear(tmp_path, "fedsim sweep --overwrite")
        assert (tmp_path / "report.md").exists()  # refused before anything was removed
    finally:
        proc.kill()
        proc.wait()


def test_a_clear_that_fails_part_way_removes_the_finished_marker_first(tmp_path,
                                                                      monkeypatch):
    for name in ("model.pt", "rounds.jsonl", "summary.json"):
        (tmp_path / name).write_text(name)
    Fault("rounds.jsonl", "EROFS", 1, "replace").install(monkeypatch)
    with hold(tmp_path, "fedsim run --overwrite"), pytest.raises(OSError, match="EROFS"):
        clear(tmp_path, "fedsim run --overwrite")
    monkeypatch.undo()
    # summary.json went first: the folder no longer looks finished with its model gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rounds.jsonl"]
