"""Ctrl-C / SIGTERM: one ``interrupted:`` line with the resume command, exit 130 / 143, no
traceback, nothing left running; the printed resume command finishes the run exactly."""

import contextlib
import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from same_run import assert_same_run  # tests/same_run.py

import fedsim
from fedsim.cli import main
from fedsim.engine.processes import alive, descendants, find_proc, stop_tree
from fedsim.interrupt import Interrupted, run_line
from fedsim.sinks.progress import RoundsFollower

ROOT = Path(__file__).resolve().parents[1]
# long enough that the run cannot end before the signal lands, short enough to run twice
SMALL = ["server.rounds=16", "partition.num_clients=12", "server.clients_per_round=3",
         "partition.holdout_clients=0.0", "client.epochs=1", "model.width=8",
         "server.strategy=fedadam", "server.params.eta=0.01"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # one torch thread, as
# in this process (tests/conftest.py): the resumed run's float reductions then agree bitwise


def sets(overrides):
    return [a for s in overrides for a in ("--set", s)]


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until ``path`` holds ``n`` complete lines (a run's rounds.jsonl)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} did not reach {n} lines (exit {proc.poll()})")


def interrupt(proc: subprocess.Popen, signum: int) -> tuple[int, str]:
    """Send ``signum`` to ``proc``; its exit code and stderr."""
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def the_line(stderr: str) -> str:
    """The one ``interrupted:`` line, which ends stderr; no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(lines) == 1, stderr
    assert stderr.rstrip().splitlines()[-1] == lines[0]
    return lines[0]


def left_running(tree) -> list:
    """The processes of ``tree`` still running after a short wait for them to exit."""
    deadline = time.monotonic() + 10
    while (left := [p for p in tree if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_signal_to_fedsim_run_prints_the_resume_command_which_finishes_it_exactly(
        tmp_path, signum, code):
    ref = fedsim.run("scenarios/quickstart.toml", SMALL, out=tmp_path / "ref").path
    out = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsim.cli", "run", "scenarios/quickstart.toml", *sets(SMALL),
         "--out", str(out)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_lines(out / "rounds.jsonl", 3, proc)  # rounds 0, 1 and 2 recorded
    tree = descendants([proc.pid])
    rc, err = interrupt(proc, signum)
    assert rc == code, err
    line = the_line(err)
    assert line.startswith("interrupted: round ") and " of 16 complete" in line, line
    assert not (out / "summary.json").exists()
    assert not left_running(tree)

    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command == ["fedsim", "run", "--resume", str(out)]
    k = int(line.split("round ", 1)[1].split()[0])
    assert main([*command[1:], "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == [k]  # the round the line named: nothing else lost
    assert_same_run(ref, out)


def start_sweep(out: Path) -> tuple[subprocess.Popen, list[str]]:
    """``fedsim sweep`` of three seeds on two worker processes, writing to ``out``, in a
    session of its own (so a signal to its process group reaches only it); the process
    and the sweep's arguments."""
    argv = ["sweep", "scenarios/quickstart.toml", *sets(SMALL[:-2]), "--set",
            "sweep.seed=[0,1,2]", "--out", str(out), "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", *argv], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return proc, argv


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigint_to_a_sweep_with_worker_processes_names_the_cells_and_the_resume_command(
        tmp_path):
    out = tmp_path / "sweep"
    proc, argv = start_sweep(out)
    deadline = time.monotonic() + 100
    while proc.poll() is None and time.monotonic() < deadline:  # a cell recorded round 1
        if any(p.read_text().count("\n") >= 2 for p in out.glob("*/rounds.jsonl")):
            break
        time.sleep(0.02)
    tree = descendants([proc.pid])
    assert len(tree) >= 2  # the two sweep workers (and multiprocessing's helper)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    line = the_line(err)
    assert line.startswith("interrupted: 0 of 3 cells done; stopped: seed-"), line
    assert line.endswith("resume with: " + shlex.join(["fedsim", *argv])), line
    assert not left_running(tree)
    for cell in out.glob("seed-*"):  # a stopped cell keeps its checkpoints, and no result
        assert not (cell / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigint_while_sweep_workers_are_still_starting_prints_no_traceback(tmp_path):
    """Ctrl-C while the spawned workers still import fedsim (before their initializer runs):
    they start with SIGINT blocked, so none of them prints a KeyboardInterrupt traceback."""
    out = tmp_path / "sweep"
    proc, argv = start_sweep(out)
    deadline = time.monotonic() + 100
    tree = set()
    while proc.poll() is None and time.monotonic() < deadline:  # both workers spawned
        tree = descendants([proc.pid])
        spawned = [p for p in tree if b"spawn_main" in _cmdline(p.pid)]
        if len(spawned) >= 2:
            break
        time.sleep(0.005)
    assert not any(out.glob("*/rounds.jsonl"))  # no cell has started: the workers import
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    line = the_line(err)
    assert line.startswith("interrupted: 0 of 3 cells done"), line
    assert not left_running(tree)


def _cmdline(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


FLOWER_CLI = pytest.mark.skipif(
    sys.platform != "linux" or not (Path(sys.executable).parent / "flower-superlink").exists(),
    reason="needs the flwr CLI next to this Python and /proc")
DEPLOY = """name = "deploy-stop"
seed = 0
[partition]
kind = "dirichlet"
num_clients = 2
[model]
width = 8
[server]
rounds = 20
clients_per_round = 2
"""


def listening_ports(pids=None) -> set[int]:
    """TCP ports in LISTEN state (of the processes ``pids`` only, if given), from /proc."""
    inodes = None
    if pids is not None:
        inodes = set()
        for pid in pids:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for row in fh.read().splitlines()[1:]:
                parts = row.split()
                if parts[3] == "0A" and (inodes is None or parts[9] in inodes):
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.slow
@pytest.mark.timeout(300)
@FLOWER_CLI
def test_sigterm_to_the_deployment_engine_stops_every_process_it_started(tmp_path):
    scenario = tmp_path / "deploy.toml"
    scenario.write_text(DEPLOY)
    out = tmp_path / "results"
    argv = [str(scenario), "--out", str(out), "--app-dir", str(ROOT), "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.engine.deploy", *argv],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    tree = set()
    while proc.poll() is None and time.monotonic() < deadline:  # every process is up: the
        tree = descendants([proc.pid])  # SuperLink has started the ServerApp
        cmds = []
        for p in tree:
            with contextlib.suppress(OSError):
                cmds.append(Path(f"/proc/{p.pid}/cmdline").read_bytes())
        if any(b"flwr-serverapp" in c for c in cmds) and sum(b"flower-supernode" in c
                                                               for c in cmds) == 2:
            break
        time.sleep(0.1)
    ports = listening_ports(p.pid for p in tree)
    assert len(tree) >= 6 and len(ports) >= 3, (tree, ports)  # link, 2 nodes, their SuperExecs
    rc, err = interrupt(proc, signal.SIGTERM)
    assert rc == 143, err
    line = the_line(err)
    assert line.startswith("interrupted"), line
    assert line.endswith(shlex.join(["python", "-m", "fedsim.engine.deploy", *argv])) or \
        "resume with: fedsim run --resume" in line, line
    assert not left_running(tree)
    tree_after = descendants([proc.pid])  # the child is gone: nothing may hang below it
    assert not tree_after
    assert not ports & listening_ports()


# ---------------------------------------------------------------- the parts, fast


def test_interrupted_names_its_signal_and_exit_code_and_crosses_processes():
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        exc = pickle.loads(pickle.dumps(Interrupted(signum)))
        assert isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Exception)
        assert (exc.signum, exc.exit_code) == (signum, code)


def test_run_line_without_a_checkpoint_says_how_to_start_again(tmp_path):
    cmd = ["fedsim", "run", "s.toml", "--out", str(tmp_path / "r")]
    line = run_line(tmp_path / "r", 10, started=False, checkpoint_every=1, restart=cmd)
    assert line == f"interrupted before the first round; start it again with: {shlex.join(cmd)}"
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "scenario.toml").write_text("")  # the run's unfinished folder
    line = run_line(tmp_path / "r", 10, started=True, checkpoint_every=0, restart=cmd)
    assert "(output.checkpoint_every = 0), nothing to resume" in line
    assert line.endswith(shlex.join([*cmd, "--overwrite"]))


def test_rounds_follower_skips_an_earlier_runs_file_and_returns_complete_lines(tmp_path):
    path = tmp_path / "rounds.jsonl"
    path.write_text('{"round": 0}\n{"round": 1}\n')  # an earlier run's
    follow = RoundsFollower(path)
    assert follow.poll() == []
    path.write_text('{"round": 0}\n{"rou')  # the new run rewrote it; half a line so far
    assert follow.poll() == [{"round": 0}]
    with open(path, "a") as fh:
        fh.write('nd": 1}\n')
    assert follow.poll() == [{"round": 1}]
    path.write_text('{"round": 0}\n')  # truncated (a resume): read again from the start
    assert follow.poll() == [{"round": 0}]


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_stop_tree_stops_children_that_left_for_a_session_of_their_own():
    # the leader's child starts its own session (as Flower's SuperLink starts its SuperExec),
    # and that one has a child of its own
    leader = subprocess.Popen(
        ["sh", "-c", "setsid sh -c 'sleep 60 & sleep 60' & sleep 60"],
        start_new_session=True)
    root = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        root = find_proc(leader.pid)
        if root and len(descendants([leader.pid])) >= 4:
            break
        time.sleep(0.05)
    tree = descendants([leader.pid])
    assert len(tree) >= 4, tree
    assert stop_tree([root], grace=2.0) == []
    leader.wait(timeout=5)
    assert not [p for p in tree if alive(p)]


# ------------------------------------------------- a SIGTERM during each atomic write

TINY = ["server.rounds=2", "partition.num_clients=6", "server.clients_per_round=3",
        "partition.holdout_clients=0.0", "client.epochs=1", "model.width=8"]

#: (file, when, nth, op): the SIGTERM lands while the nth write of the file is under way
#: (``during``: its temporary file is being written; for checkpoint.prev.pt, before the
#: link) or just after the rename that completes it (``after``). Rounds.jsonl is written
#: 1 at its creation, 2 for round 0, 3 the checkpoint's sync, 4 round 1...; checkpoint.pt
#: at rounds 0, 1, 2 (its previous one linked as checkpoint.prev.pt from round 1 on).
ATOMIC_WRITES = {
    "scenario.toml-during": ("scenario.toml", "SIGTERM", 1, "open"),
    "scenario.toml-after": ("scenario.toml", "SIGTERM-after", 1, "replace"),
    "rounds.jsonl-created": ("rounds.jsonl", "SIGTERM-after", 1, "replace"),
    "rounds.jsonl-append": ("rounds.jsonl", "SIGTERM", 4, "open"),
    "checkpoint.pt-during": ("checkpoint.pt", "SIGTERM", 3, "open"),
    "checkpoint.pt-after": ("checkpoint.pt", "SIGTERM-after", 2, "replace"),
    "checkpoint.prev.pt-during": ("checkpoint.prev.pt", "SIGTERM", 2, "link"),
    "checkpoint.prev.pt-after": ("checkpoint.prev.pt", "SIGTERM-after", 2, "replace"),
    "model.pt-during": ("model.pt", "SIGTERM", 1, "open"),
    "model.pt-after": ("model.pt", "SIGTERM-after", 1, "replace"),
    "learning_curves.png-during": ("learning_curves.png", "SIGTERM", 1, "open"),
    "summary.json-during": ("summary.json", "SIGTERM", 1, "open"),
    "summary.json-after": ("summary.json", "SIGTERM-after", 1, "replace"),
}


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "r"
    assert main(["run", "scenarios/quickstart.toml", *sets(TINY), "--out", str(out),
                 "--quiet"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("write", list(ATOMIC_WRITES))
def test_a_sigterm_during_an_atomic_write_leaves_a_folder_its_line_tells_true(
        write, tiny_ref, tmp_path, capsys, monkeypatch):
    from faults import Fault  # tests/faults.py

    from fedsim.checkpoint import load_checkpoint
    from fedsim.lock import held_folders

    out = tmp_path / "r"
    argv = ["run", "scenarios/quickstart.toml", *sets(TINY), "--out", str(out), "--quiet"]
    fault = Fault(*ATOMIC_WRITES[write]).install(monkeypatch)
    assert main(argv) == 143
    monkeypatch.undo()
    assert fault.fired and held_folders() == []
    line = the_line(capsys.readouterr().err)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no torn temporary
    if line.startswith("interrupted: the run had finished"):
        assert write == "summary.json-after"
    elif "resume with: " in line:
        k = int(line.split("round ", 1)[1].split()[0])
        assert line == (f"interrupted: round {k} of 2 complete, checkpoint in {out}; resume "
                        f"with: fedsim run --resume {out}")
        # the checkpoint --resume takes is the one the line names
        assert load_checkpoint(out, fedsim.load_scenario(out / "scenario.toml")).round == k
        assert main(["run", "--resume", str(out), "--quiet"]) == 0
        assert json.loads((out / "summary.json").read_text())["resumed_from"] == [k]
    else:
        assert "start it again with: fedsim run " in line, line
        assert main(shlex.split(line.split("start it again with: ", 1)[1])[1:]) == 0
    assert_same_run(tiny_ref, out)
    expected = {"checkpoint.pt-during": 1, "checkpoint.prev.pt-during": 1,
                "checkpoint.pt-after": 1, "rounds.jsonl-append": 0, "model.pt-during": 2}
    if write in expected:  # the newest complete checkpoint, whatever the write was doing
        assert json.loads((out / "summary.json").read_text())["resumed_from"] == [
            expected[write]]
