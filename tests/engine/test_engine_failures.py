"""Engines that fail fast: a setting the machine or cluster cannot serve is refused in
preflight (one ``error:`` line, exit 2, nothing written, within a bound), and an engine that
dies mid-run ends the run with one ``error:`` line (exit 4) keeping its last checkpoint.

Ray is started by one test only (a Flower Ray run whose actors are killed); the refusals
happen before Ray is imported, and the other deaths are injected at the engine boundary."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict

from fedsim import EngineFailed, compat
from fedsim.cli import main
from fedsim.config import EngineConfig
from fedsim.engine import deploy
from fedsim.engine.inprocess import InProcessGrid
from fedsim.engine.processes import descendants
from fedsim.engine.ray import EngineWatch, WatchedGrid
from fedsim.engine.ray_check import PROBE_TIMEOUT, check_resources, cluster_nodes, probe
from fedsim.errors import ScenarioError

ROOT = Path(__file__).resolve().parents[2]
TINY = ["partition.num_clients=4", "server.clients_per_round=2", "partition.holdout_clients=0.0",
        "model.arch=mlp", "model.norm=none", "model.width=8", "client.epochs=1"]
CPUS = os.cpu_count() or 1


def closed_port() -> int:
    """A port on 127.0.0.1 nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sets(*overrides: str) -> list[str]:
    return [a for o in (*TINY, *overrides) for a in ("--set", o)]


# --------------------------------------------------------------------------- refused up front


@pytest.mark.parametrize("address", ["::::", "127.0.0.1", "host:0", "host:65536", ":6379",
                                     "-bad-:6379", "a..b:1", "[zz]:1", "h st:1"])
def test_a_malformed_ray_address_is_refused_when_the_scenario_loads(address):
    with pytest.raises(ScenarioError, match=r"engine.ray_address = .* is not a Ray cluster "
                                            r"address; use 'host:port'"):
        EngineConfig(kind="ray", ray_address=address)


@pytest.mark.parametrize("address", ["auto", "10.0.0.5:6379", "[::1]:6379", "head-1.lan:6379",
                                     "ray://head:10001"])
def test_well_formed_ray_addresses_load(address):
    assert EngineConfig(kind="ray", ray_address=address).ray_address == address


def test_an_address_nobody_serves_is_refused_at_once():
    t0 = time.monotonic()
    port = closed_port()
    with pytest.raises(ScenarioError, match=rf"engine.ray_address = '127.0.0.1:{port}': nothing "
                                            r"accepts a connection there .*Connection refused"):
        probe(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < PROBE_TIMEOUT


def test_a_name_that_does_not_resolve_is_refused_within_the_probe_bound():
    t0 = time.monotonic()
    with pytest.raises(ScenarioError, match=r"engine.ray_address = 'nohost.invalid:6379': the "
                                            r"name 'nohost.invalid' (does not resolve|did not "
                                            r"resolve within 2 s)"):
        probe("nohost.invalid:6379", timeout=2.0)
    assert time.monotonic() - t0 < 2.0 + 0.5


def test_a_listener_that_is_not_ray_is_refused_within_the_connect_bound():
    """Something accepts connections on the port but is no Ray cluster: ``ray.init`` would
    retry forever, so the child that tries is stopped at the bound."""
    server = socket.socket()
    server.bind(("0.0.0.0", 0))
    server.listen(8)
    port = server.getsockname()[1]
    try:
        t0 = time.monotonic()
        with pytest.raises(ScenarioError, match=rf"'127.0.0.1:{port}': something answers there, "
                                                r"but Ray did not join it within 6 s"):
            cluster_nodes(f"127.0.0.1:{port}", timeout=6.0)
        assert time.monotonic() - t0 < 6.0 + PROBE_TIMEOUT
    finally:
        server.close()


@pytest.mark.parametrize(("cfg", "nodes", "pattern"), [
    (EngineConfig(kind="ray", client_gpus=0.5), [{"CPU": 2, "GPU": 0}],
     r"engine.client_gpus = 0.5 but this machine has no GPU; set engine.client_gpus = 0"),
    (EngineConfig(kind="ray", ray_num_cpus=3), [{"CPU": 2, "GPU": 0}],
     r"one Ray client actor needs engine.ray_num_cpus = 3 CPUs, but this machine has 2 CPUs "
     r"and 0 GPUs; lower engine.ray_num_cpus"),
    (EngineConfig(kind="ray", vectorize=True, ray_workers=3), [{"CPU": 2, "GPU": 0}],
     r"engine.ray_workers = 3 actors .* need 3 CPUs, but this machine has 2"),
    (EngineConfig(kind="ray", vectorize=True, ray_workers=3, client_gpus=0.5),
     [{"CPU": 8, "GPU": 1}], r"need 1.5 GPUs, but this machine has 1"),
    (EngineConfig(kind="ray", ray_num_cpus=4, ray_address="10.0.0.5:6379"),
     [{"CPU": 2}, {"CPU": 3, "GPU": 1}],
     r"no node of the Ray cluster at 10.0.0.5:6379 has that much \(the largest: 3 CPUs and "
     r"1 GPUs\)"),
])
def test_resources_that_are_not_there_are_refused(cfg, nodes, pattern):
    where = f"the Ray cluster at {cfg.ray_address}" if cfg.ray_address else "this machine"
    with pytest.raises(ScenarioError, match=pattern):
        check_resources(cfg, nodes, where)


def test_resources_that_fit_pass():
    check_resources(EngineConfig(kind="ray", vectorize=True, ray_workers=2, client_gpus=0.5),
                    [{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 0}], "the Ray cluster at x")
    check_resources(EngineConfig(kind="ray", ray_num_cpus=2), [{"CPU": 2}], "this machine")


@pytest.mark.parametrize(("overrides", "pattern"), [
    (["engine.kind=ray", "engine.client_gpus=0.5"], "engine.client_gpus = 0.5 but this machine "
                                                    "has no GPU"),
    (["engine.kind=ray", "engine.vectorize=true", "engine.client_gpus=0.5"],
     "engine.client_gpus = 0.5 but this machine has no GPU"),
    (["engine.kind=ray", f"engine.ray_num_cpus={CPUS + 1}"],
     f"one Ray client actor needs engine.ray_num_cpus = {CPUS + 1} CPUs"),
    (["engine.kind=ray", "engine.ray_address=ADDRESS"], "nothing accepts a connection there"),
    (["engine.kind=ray", "engine.vectorize=true", "engine.ray_address=ADDRESS"],
     "nothing accepts a connection there"),
    (["engine.device=cuda:7"], "engine.device = 'cuda:7'"),
], ids=["ray-gpu", "cohorts-gpu", "ray-cpus", "ray-address", "cohorts-address", "device"])
def test_the_cli_refuses_what_the_engine_cannot_run_before_writing(tmp_path, capsys, overrides,
                                                                  pattern):
    if any(o.startswith("engine.device") for o in overrides) and _cuda_devices() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    overrides = [o.replace("ADDRESS", f'"127.0.0.1:{closed_port()}"') for o in overrides]
    out = tmp_path / "out"
    t0 = time.monotonic()
    code = main(["run", "scenarios/quickstart.toml", "--out", str(out), "--quiet",
                 *sets(*overrides)])
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert pattern in err and "Traceback" not in err
    assert not out.exists()  # refused before the results folder is made
    assert took < 60, took  # the scenario's data and model are built first; no Ray starts
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def test_the_deployment_engine_refuses_an_absent_gpu_before_starting_processes(tmp_path,
                                                                               capsys):
    if _cuda_devices():
        pytest.skip("this machine has a GPU")
    before = descendants([os.getpid()])
    code = deploy.main(["scenarios/quickstart.toml", "--out", str(tmp_path / "d"), "--quiet",
                        *sets("engine.device=cuda")])
    err = capsys.readouterr().err
    assert code == 2 and err == ("error: engine.device = 'cuda' but CUDA is not available here; "
                                 "use 'auto' or 'cpu'\n")
    assert not (tmp_path / "d").exists() and descendants([os.getpid()]) == before


# --------------------------------------------------------------------------- mid-run deaths


def test_a_worker_thread_that_raises_ends_the_run_with_one_line_and_keeps_the_checkpoint(
        tmp_path, capsys, monkeypatch):
    """An in-process worker thread raising (not a client: a client's exception is an error
    reply) in round 2: exit 4, one ``error:`` line naming the round, the cause and the
    checkpoint of round 1, the traceback in error.txt; the run then resumes to the end."""
    do = InProcessGrid._do

    def broken(self, job):
        msg = job[0][1]
        if msg.metadata.message_type == MessageType.TRAIN and \
                msg.content["config"]["server-round"] == 2:
            raise RuntimeError("worker lost its model copy")
        return do(self, job)

    monkeypatch.setattr(InProcessGrid, "_do", broken)
    out = tmp_path / "r"
    code = main(["run", "scenarios/quickstart.toml", "--out", str(out), "--quiet",
                 *sets("server.rounds=3", "engine.workers=2", "server.fraction_evaluate=0")])
    err = capsys.readouterr().err
    assert code == 4 and err.count("\n") == 1, err
    assert err == (f"error: the run failed in round 2 on the inprocess engine: RuntimeError: "
                   f"worker lost its model copy (traceback in {out / 'error.txt'}); the "
                   f"checkpoint of round 1 is kept in {out}; resume with: fedsim run --resume "
                   f"{out}\n")
    assert "Traceback" in (out / "error.txt").read_text()
    assert not (out / "summary.json").exists()
    monkeypatch.setattr(InProcessGrid, "_do", do)
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == [1]


def test_a_failed_run_whose_traceback_cannot_be_written_still_ends_in_one_line(
        tmp_path, capsys, monkeypatch):
    """The disk is full when error.txt is written: the failure is still told, in one line,
    without the pointer to a traceback that was not kept."""
    from faults import Fault  # tests/faults.py

    do = InProcessGrid._do

    def broken(self, job):
        if job[0][1].metadata.message_type == MessageType.TRAIN:
            raise RuntimeError("worker lost its model copy")
        return do(self, job)

    monkeypatch.setattr(InProcessGrid, "_do", broken)
    fault = Fault("error.txt").install(monkeypatch)
    out = tmp_path / "r"
    code = main(["run", "scenarios/quickstart.toml", "--out", str(out), "--quiet",
                 *sets("server.rounds=2", "server.fraction_evaluate=0")])
    err = capsys.readouterr().err
    assert fault.fired and code == 4 and err.count("\n") == 1, err
    assert err.startswith("error: the run failed in round 1 on the inprocess engine: "
                          "RuntimeError: worker lost its model copy; ") and "traceback" not in err
    assert not (out / "error.txt").exists()


def _message(node: int) -> Message:
    with compat.task_identity_restored():
        compat.set_task_identity(1)
        return Message(RecordDict({"config": ConfigRecord({"x": 1})}), node, MessageType.TRAIN)


class _SilentGrid:
    """The part of a Grid :class:`WatchedGrid` uses, whose replies are ``replies`` once and
    then never come (a simulation whose runtime has crashed)."""

    def __init__(self, replies=()):
        self.answer = list(replies)

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            compat.set_message_id(m, f"m{i}")
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids):
        out, self.answer = self.answer, []
        return out

    def get_node_ids(self):
        return [1, 2]


def test_a_failed_simulation_stops_the_wait_for_replies_at_once():
    watch = EngineWatch()
    grid = WatchedGrid(_SilentGrid(), watch)
    threading.Timer(0.3, watch.fail, args=("Flower's Ray simulation stopped (ValueError: x)",)
                    ).start()
    t0 = time.monotonic()
    with pytest.raises(EngineFailed, match=r"Flower's Ray simulation stopped \(ValueError: x\)"):
        grid.send_and_receive([_message(1)], timeout=3600)
    assert time.monotonic() - t0 < 1.0


def test_a_caller_that_polls_the_grid_itself_is_stopped_too():
    """fedsim's ClientOrderedGrid pushes and pulls on its own (and waits for nodes to
    register by asking for them again): each call raises once the simulation has failed."""
    watch = EngineWatch()
    grid = WatchedGrid(_SilentGrid(), watch)
    assert list(grid.pull_messages(["m0"])) == []
    watch.fail("Flower's Ray simulation stopped (RuntimeError: y)")
    for call in (lambda: grid.pull_messages(["m0"]), grid.get_node_ids):
        with pytest.raises(EngineFailed, match=r"simulation stopped \(RuntimeError: y\)"):
            call()


def test_a_reply_saying_a_ray_actor_died_ends_the_run():
    msg = _message(1)
    compat.set_message_id(msg, "m0")
    died = Message(Error(code=0, reason="<class 'ray.exceptions.ActorDiedError'>:<'The actor "
                                        "died unexpectedly before finishing this task.\n\t"
                                        "class_name: ClientAppActor'>"), reply_to=msg)
    raised = Message(Error(code=0, reason="node 1 raised ValueError: bad batch"), reply_to=msg)
    assert compat.simulation_process_lost(raised) is None  # a client's own error: the run goes on
    watch = EngineWatch()
    grid = WatchedGrid(_SilentGrid([died]), watch)
    with pytest.raises(EngineFailed, match=r"a Ray process of the simulation died "
                                           r"\(ActorDiedError: The actor died unexpectedly "
                                           r"before finishing this task.\)$"):
        grid.send_and_receive([_message(1)], timeout=3600)
    assert watch.failed is not None


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_ray_actors_end_a_flower_ray_run_with_one_line(tmp_path):
    """SIGKILL Flower's Ray client actors after round 1: the run ends within the bound with
    exit 4 and one ``error:`` line (no traceback, none of Flower's logs), the checkpoints
    kept, and no process of the run left."""
    out = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "RAY_memory_monitor_refresh_ms": "0"}  # a busy machine's memory: not this test's
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run",
                             "scenarios/quickstart.toml", "--out", str(out), "--quiet",
                             *sets("server.rounds=50", "engine.kind=ray")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            rounds = out / "rounds.jsonl"
            if rounds.exists() and rounds.read_text().count("\n") >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1]
        actors = [p for p in descendants([proc.pid]) if b"ClientAppActor" in _cmdline(p.pid)]
        assert actors
        for p in actors:
            os.kill(p.pid, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 4, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    assert "Traceback" not in err
    assert errors[0].startswith("error: the run failed in round ") and \
        "on the ray engine: a Ray process of the simulation died (" in errors[0], errors[0]
    assert f"is kept in {out}; resume with: fedsim run --resume {out}" in errors[0]
    assert (out / "checkpoint.pt").is_file() and not (out / "summary.json").exists()
    assert took < 60, took


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_a_supernode_that_exits_mid_run_ends_a_deployed_run_within_the_poll(tmp_path,
                                                                            monkeypatch):
    """The local Deployment Engine watches its SuperLink and SuperNodes while ``flwr run``
    goes: one that exits ends the run with EngineFailed naming it, within the poll interval
    (the ServerApp would otherwise wait an hour for that node's replies). Stand-in processes
    (sleeping Pythons) play the SuperNodes and ``flwr run``; one is killed mid-run."""
    sleeper = tmp_path / "sleeper"
    sleeper.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(120)\n")
    sleeper.chmod(0o755)
    monkeypatch.setattr(deploy, "_executable", lambda name: str(sleeper))
    dep = deploy.LocalDeployment(num_nodes=2, workdir=tmp_path / "dep")
    try:
        nodes = [dep._spawn(f"supernode-{i}", [str(sleeper)], f"flower-supernode {i}")
                 for i in range(2)]
        threading.Timer(1.0, nodes[1].kill).start()
        t0 = time.monotonic()
        with pytest.raises(EngineFailed, match=rf"flower-supernode 1 \(pid {nodes[1].pid}\) "
                                               r"exited with code -9 during the run; logs in "):
            dep.run(tmp_path, {"out": str(tmp_path / "out")}, timeout=60)
        assert time.monotonic() - t0 < 1.0 + 2 * deploy.POLL + 1.0
    finally:
        dep.stop(grace=1.0)
    assert all(p.poll() is not None for p in nodes)


def test_a_deployed_run_the_server_stopped_is_not_reported_as_finished(tmp_path):
    """``flwr run`` exits 0 when the ServerApp stopped the run early (its SuperNodes gone:
    "Node Unavailable" replies until too few answered): the launcher reads summary.json and
    fails as ``fedsim run`` does (RunStopped, exit 2); a planned DP-budget end is a finish."""
    from fedsim.errors import RunStopped

    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"stopped": {"round": 3, "reason": "round 3: only 0 valid "
                                            "client replies"}}))
    with pytest.raises(RunStopped, match="round 3: only 0 valid client replies"):
        deploy._raise_if_stopped(path)
    path.write_text(json.dumps({"stopped": {"round": 3, "reason": "budget"},
                                "dp": {"stopped": "ε would exceed 2"}}))
    deploy._raise_if_stopped(path)
