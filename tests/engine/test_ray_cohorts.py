"""Vectorized cohorts on Ray actors (engine.kind = "ray", engine.vectorize = true): the same
run as the in-process vectorized engine, client state following clients across actors, a
killed actor retried per [failures], Ctrl-C, and the settings refused before training."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from same_run import assert_same_run, records  # tests/same_run.py

import fedsim
from fedsim import compat
from fedsim.cli import main
from fedsim.client.messages import error_reply
from fedsim.config import load_scenario
from fedsim.engine.processes import alive, descendants
from fedsim.engine.ray_cohorts import (
    INLINE_RESULT_BYTES,
    LOCAL_RAY_ENV,
    CohortPool,
    CohortTask,
    check_ray_cohorts,
    cohort_sizes,
    from_wire,
    run_ray_cohorts,
    to_wire,
)
from fedsim.errors import ScenarioError

ROOT = Path(__file__).resolve().parents[2]
# 4 of 8 clients per round in cohorts of 2: the in-process engine's cohorts are the same
# pairs as the two actors', so both engines run the same kernels on the same inputs
SMALL = ["partition.num_clients=8", "server.clients_per_round=4",
         "partition.holdout_clients=0.0", "model.norm=bn", "client.epochs=1",
         "engine.vectorize=true", "engine.cohort_size=2", "engine.threads=1"]
RAY = ["engine.kind=ray", "engine.ray_workers=2", "engine.ray_num_cpus=1"]


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module's runs (each run joins it instead of starting its own)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence a Ray notice
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def assignments(monkeypatch):
    """(message kind, node id, actor) of every message sent to an actor, in order."""
    sent: list[tuple[str, int, int]] = []
    submit = CohortPool._submit

    def spy(self, k, task):
        sent.extend((task.kind, node, k) for node in task.nodes)
        return submit(self, k, task)

    monkeypatch.setattr(CohortPool, "_submit", spy)
    return sent


# --------------------------------------------------------------------------- settings


def test_cohort_sizes_are_balanced_bounded_and_a_multiple_of_the_actors():
    assert cohort_sizes(100, 2, 128) == [50, 50]
    assert cohort_sizes(300, 2, 128) == [75, 75, 75, 75]
    assert cohort_sizes(5, 2, 2) == [2, 1, 1, 1]
    assert cohort_sizes(1, 4, 128) == [1]
    assert cohort_sizes(0, 2, 128) == []
    for n, w, c in ((7, 3, 2), (1000, 2, 128), (9, 2, 4)):
        sizes = cohort_sizes(n, w, c)
        assert sum(sizes) == n and max(sizes) <= c and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("value", [0, -1])
def test_bad_ray_workers_is_refused_naming_the_key(value):
    with pytest.raises(ScenarioError, match=r"engine\.ray_workers = .* it must be an integer"):
        load_scenario("scenarios/quickstart.toml", [f"engine.ray_workers={value}"])


def test_more_actors_than_local_cpus_is_refused_before_ray_starts():
    scn = load_scenario("scenarios/quickstart.toml", RAY + ["engine.vectorize=true",
                                                            "engine.ray_workers=3"])
    with pytest.raises(ScenarioError, match=r"need 3 CPUs, but this machine has 2"):
        check_ray_cohorts(scn, cpus=2)
    check_ray_cohorts(scn, cpus=3)  # fits
    remote = load_scenario("scenarios/quickstart.toml",
                           RAY + ["engine.ray_workers=64", "engine.ray_address=10.0.0.5:6379"])
    check_ray_cohorts(remote, cpus=2)  # a cluster is checked once connected


def test_cli_refuses_bad_ray_workers_with_an_error_line(tmp_path, capsys):
    code = main(["run", "scenarios/quickstart.toml", "--out", str(tmp_path / "r"), "--quiet",
                 "--set", "engine.ray_workers=0"])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error:") and "engine.ray_workers" in err, err


def test_importing_the_cli_does_not_import_ray():
    code = "import sys, fedsim.cli, fedsim.engine; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("address", ["", "127.0.0.1:6379"], ids=["local", "cluster"])
def test_a_local_ray_starts_with_inline_results_and_a_cluster_keeps_its_own(
        monkeypatch, address):
    """Ray reads its settings from the environment of the processes it starts: a local Ray
    this run starts gets LOCAL_RAY_ENV (actors at the driver's priority, cohort results up
    to INLINE_RESULT_BYTES inline); a cluster's settings are left alone; the environment is
    restored afterwards either way."""
    seen: list[dict] = []

    class Stop(Exception):
        pass

    def start(self):
        seen.append({k: os.environ.get(k) for k in LOCAL_RAY_ENV})
        raise Stop

    monkeypatch.setattr(CohortPool, "start", start)
    for key in LOCAL_RAY_ENV:
        monkeypatch.delenv(key, raising=False)
    sc = load_scenario("scenarios/quickstart.toml", SMALL + RAY + [
        f"engine.ray_address={address}"])
    run = type("Run", (), {"scenario": sc})()
    with pytest.raises(Stop):
        run_ray_cohorts(None, None, run, None)
    assert seen == [dict(LOCAL_RAY_ENV) if not address else dict.fromkeys(LOCAL_RAY_ENV)]
    assert LOCAL_RAY_ENV["RAY_max_direct_call_object_size"] == str(INLINE_RESULT_BYTES)
    assert not any(k in os.environ for k in LOCAL_RAY_ENV)


def test_a_cohort_crosses_the_wire_as_bytes_and_comes_back_whole():
    """A task and its result cross as one bytes object each (what Ray passes through as it
    is) and come back with every array bitwise, every config value, the metadata, the
    states and an error reply's reason."""
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3) / 7, "n": np.array(3),
              "e": np.zeros((0, 4), np.float64)}
    with compat.task_identity_restored():
        compat.set_task_identity(11)  # a Message with a destination needs Flower's sender
        msgs = [Message(RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "config": ConfigRecord({"lr": 0.05, "server-round": 2})}), node, MessageType.TRAIN)
            for node in (3, 7)]
    task = CohortTask(MessageType.TRAIN, msgs, [3, 7], [b"\x00state", None], 11, 8, {"k": 1})
    data = to_wire(task)
    assert isinstance(data, bytes)
    back = from_wire(data)
    assert (back.kind, back.nodes, back.states, back.run_id, back.num_nodes, back.run_config) \
        == (task.kind, task.nodes, task.states, task.run_id, task.num_nodes, task.run_config)
    for a, b in zip(task.messages, back.messages):
        assert a.metadata == b.metadata
        assert dict(b.content["config"]) == dict(a.content["config"])
        for key, value in arrays.items():
            got = b.content["arrays"][key].numpy()
            assert got.dtype == value.dtype and got.tobytes() == value.tobytes(), key
    result = [(Message(RecordDict({"metrics": MetricRecord({"loss": 0.25})}), reply_to=msgs[0]),
               b"new"), (error_reply(msgs[1], RuntimeError("boom"), 7), None)]
    (ok, state), (err, none) = from_wire(to_wire(result))
    assert ok.metadata.reply_to_message_id == result[0][0].metadata.reply_to_message_id
    assert ok.content["metrics"]["loss"] == 0.25 and state == b"new" and none is None
    assert err.has_error() and err.error.reason == "client 7 raised RuntimeError: boom"


# --------------------------------------------------------------------------- runs


def assert_same_as_inprocess(ref: Path, other: Path) -> None:
    """tests/same_run.py's check across engines: bitwise model, equal round records, equal
    summary apart from timing and the engine's name."""
    a = torch.load(ref / "model.pt", weights_only=True)
    b = torch.load(other / "model.pt", weights_only=True)
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert records(ref) == records(other)
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (ref, other))
    assert (sa.pop("engine"), sb.pop("engine")) == ("inprocess", "ray")
    for s in (sa, sb):
        s.pop("timing")
        s.pop("resumed_from", None)
    assert sa == sb


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("extra", [
    ["server.strategy=fedavg", "server.rounds=2", "failures.crash=0.5",
     "failures.dropout=0.1"],
    ["server.strategy=fedbn", "server.rounds=3"],
    ["server.strategy=scaffold", "server.rounds=3"],
    ["server.strategy=fedavg", "server.rounds=2", "server.bn_statistics=recalibrate"],
], ids=["fedavg-failures", "fedbn", "scaffold", "bn-recalibrate"])
def test_ray_cohorts_equal_inprocess_vectorized(ray_cluster, assignments, tmp_path, extra):
    """Same seed, same cohorts: the same kernels on the same inputs in another process, so
    the model is bitwise the in-process vectorized engine's, and so are the round records
    (simulated crashes and dropouts included). FedBN and SCAFFOLD keep client state; it
    follows each client to whichever actor trains it. Recalibration queries of BN
    statistics run as cohorts on the actors too."""
    sc = SMALL + extra
    ref = fedsim.run("scenarios/quickstart.toml", sc, out=tmp_path / "inprocess")
    got = fedsim.run("scenarios/quickstart.toml", sc + RAY, out=tmp_path / "ray")
    assert_same_as_inprocess(ref.path, got.path)
    assert {k for k, _, _ in assignments} >= {"train"}
    if "server.bn_statistics=recalibrate" in extra:
        assert "query.bn_moments" in {k for k, _, _ in assignments}
        assert all(r["bn_statistics"]["applied"] for r in records(got.path)[1:])
    if "failures.crash=0.5" in extra:
        reasons = {f["reason"] for r in records(got.path) for f in r.get("failures", [])}
        assert {"crash", "dropout"} <= reasons


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_state_follows_a_client_to_another_actor(ray_cluster, assignments, tmp_path):
    """SCAFFOLD's control variates live in Context.state. A client trained by one actor and
    later by the other finds its state there (the run equals the in-process one, where the
    state never moves), and the run is the same twice."""
    sc = SMALL + ["server.strategy=scaffold", "server.rounds=4"]
    ref = fedsim.run("scenarios/quickstart.toml", sc, out=tmp_path / "inprocess")
    a = fedsim.run("scenarios/quickstart.toml", sc + RAY, out=tmp_path / "a")
    train = [(node, k) for kind, node, k in assignments if kind == "train"]
    actors: dict[int, list[int]] = {}
    for node, k in train:
        actors.setdefault(node, []).append(k)
    moved = [node for node, ks in actors.items() if len(set(ks)) > 1]
    assert moved, f"no client trained on both actors: {actors}"
    assert_same_as_inprocess(ref.path, a.path)
    b = fedsim.run("scenarios/quickstart.toml", sc + RAY, out=tmp_path / "b")
    assert_same_run(a.path, b.path)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_address_joins_a_running_cluster_and_leaves_it_running(ray_cluster, tmp_path):
    """A run in another process with engine.ray_address set connects to this module's Ray
    (instead of starting its own), gives the in-process model, and stops only its actors."""
    address = ray_cluster.get_runtime_context().gcs_address
    sc = SMALL + ["server.rounds=2"]
    ref = fedsim.run("scenarios/quickstart.toml", sc, out=tmp_path / "inprocess")
    sets = [a for s in sc + RAY + [f"engine.ray_address={address}"] for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", "scenarios/quickstart.toml",
                           *sets, "--out", str(tmp_path / "joined"), "--quiet"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert_same_as_inprocess(ref.path, tmp_path / "joined")
    assert ray_cluster.is_initialized() and ray_cluster.cluster_resources()["CPU"] == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_actor_is_restarted_and_its_round_retried(ray_cluster, monkeypatch, tmp_path,
                                                           caplog):
    """SIGKILL an actor right after it was handed the first train cohort: its clients get
    error replies naming the lost actor, fewer than failures.min_replies answer, the round
    is retried with a new sample on the restarted actor, and the run completes."""
    killed: list[int] = []
    submit = CohortPool._submit

    def kill_first_train(self, k, task):
        ref = submit(self, k, task)
        if task.kind == "train" and not killed:
            killed.append(self.pids[k])
            os.kill(self.pids[k], signal.SIGKILL)
        return ref

    monkeypatch.setattr(CohortPool, "_submit", kill_first_train)
    sc = SMALL + RAY + ["server.rounds=2", "failures.min_replies=4", "failures.retries=2"]
    run = fedsim.run("scenarios/quickstart.toml", sc, out=tmp_path / "r")
    first = records(run.path)[1]
    assert first["attempts"] == 2 and first["updates"] == 4
    lost = [f for f in first["failures"] if f["reason"] == "error"]
    assert len(lost) == 2 and all("died" in f["detail"] for f in lost), first["failures"]
    assert all(f.get("attempt", 0) == 0 for f in lost)
    assert any("restarting it" in r.getMessage() for r in caplog.records)
    assert run.summary["final"]["global_test_accuracy"] > 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigint_ends_with_the_interrupted_line_and_resumes_exactly(ray_cluster, tmp_path):
    """Ctrl-C while actors train: one ``interrupted:`` line, exit 130, no traceback, and no
    process of the run (driver, its local Ray, the actors) left running. The resume command
    it prints finishes the run exactly: the in-process vectorized run, bit for bit (client
    state is checkpointed from the driver's store as in-process)."""
    sc = SMALL + ["server.strategy=scaffold", "server.rounds=20", "model.width=8"]
    ref = fedsim.run("scenarios/quickstart.toml", sc, out=tmp_path / "inprocess")
    out = tmp_path / "stopped"
    sets = [a for s in sc + RAY for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run",
                             "scenarios/quickstart.toml", *sets, "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        rounds = out / "rounds.jsonl"
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            if rounds.exists() and rounds.read_text().count("\n") >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        tree = descendants([proc.pid])
        assert len(tree) >= 3  # Ray's processes and the two actors
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and err.rstrip().splitlines()[-1] == lines[0], err
    assert lines[0].startswith("interrupted: round "), lines[0]
    deadline = time.monotonic() + 15
    while (left := [p for p in tree if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, left
    k = int(lines[0].split("round ", 1)[1].split()[0])
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == [k]
    assert_same_as_inprocess(ref.path, out)

