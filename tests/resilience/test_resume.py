"""Kill a run, resume it, and get exactly the run that was never interrupted (bitwise, CPU)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from audit_settings import audits  # tests/audit_settings.py
from same_run import assert_same_run, same_bits  # tests/same_run.py

import fedsim
from fedsim.checkpoint import read_checkpoint
from fedsim.cli import main
from fedsim.lock import LOCK_NAME

ROOT = Path(__file__).resolve().parents[2]
TINY = ["server.rounds=6", "partition.num_clients=12", "server.clients_per_round=3",
        "partition.holdout_clients=0.0", "client.epochs=1", "model.width=8"]
FEDADAM = TINY + ["server.strategy=fedadam", "server.params.eta=0.01"]
STATEFUL = ["server.rounds=3", "partition.num_clients=8", "server.clients_per_round=3",
            "partition.holdout_clients=0.0", "model.width=8",
            "server.strategy=tests/resilience/stateful_strategy.py:StatefulFedAvg"]


def test_sigkill_after_round_k_then_resume_equals_the_uninterrupted_run(tmp_path):
    """A subprocess is SIGKILLed once round k is recorded; ``--resume`` finishes it."""
    k = 2
    ref = fedsim.run("scenarios/quickstart.toml", FEDADAM, out=tmp_path / "ref").path
    out = tmp_path / "killed"
    sets = [a for s in FEDADAM for a in ("--set", s)]
    # one torch thread, as in this process (tests/conftest.py): float reductions then agree
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsim.cli", "run", "scenarios/quickstart.toml", *sets,
         "--out", str(out), "--quiet"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rounds = out / "rounds.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if rounds.exists() and rounds.read_text().count("\n") >= k + 1:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert not (out / "summary.json").exists()
    assert rounds.read_text().count("\n") < 7  # it really stopped before the end
    assert (out / LOCK_NAME).exists()  # the killed run's lock file, no longer locked

    assert main(["run", "--resume", str(out), "--quiet"]) == 0  # so no stale lock
    assert not (out / LOCK_NAME).exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"][0] >= k - 1  # the checkpoint of round k (or k-1 if the
    # kill landed between the round's record and its checkpoint)
    assert_same_run(ref, out)


def interrupted_copy(ref: Path, dst: Path) -> Path:
    """``ref`` as a kill right after round (last − 1)'s checkpoint would leave it: later
    rounds already in rounds.jsonl plus half a line, no summary, no model."""
    shutil.copytree(ref, dst)
    for name in ("summary.json", "model.pt", "learning_curves.png", "checkpoint.pt"):
        (dst / name).unlink()
    (dst / "checkpoint.prev.pt").rename(dst / "checkpoint.pt")
    with open(dst / "rounds.jsonl", "a") as fh:
        fh.write('{"round": 99, "clie')
    return dst


def test_resume_restores_client_state(tmp_path, monkeypatch):
    """Clients keep state in Context.state (test-counter hook) that shapes their updates:
    the checkpoint carries it, and a resume without it would give another model."""
    ref = fedsim.run("scenarios/quickstart.toml", STATEFUL, out=tmp_path / "ref").path
    resumed = fedsim.resume(interrupted_copy(ref, tmp_path / "resumed"))
    assert resumed.summary["resumed_from"] == [2]
    assert_same_run(ref, resumed.path)

    from fedsim.engine.inprocess import InProcessGrid

    monkeypatch.setattr(InProcessGrid, "import_states", lambda self, states: None)
    lost = fedsim.resume(interrupted_copy(ref, tmp_path / "lost")).path
    a = torch.load(ref / "model.pt", weights_only=True)
    b = torch.load(lost / "model.pt", weights_only=True)
    assert not all(torch.equal(a[key], b[key]) for key in a)


def resume_audits(tmp_path, sets: list[str]) -> tuple[dict, dict]:
    """Run ``sets`` uninterrupted and resumed after round (last − 1); the two runs' privacy
    summaries and the audit captures their final checkpoints hold, after checking both
    pairs are the same."""
    ref = fedsim.run("scenarios/quickstart.toml", TINY + sets, out=tmp_path / "ref").path
    resumed = fedsim.resume(interrupted_copy(ref, tmp_path / "resumed"))
    assert resumed.summary["resumed_from"] == [2]
    pa, pb = (json.loads((p / "summary.json").read_text())["privacy"]
              for p in (ref, resumed.path))
    pa.pop("seconds"), pb.pop("seconds")
    assert pa == pb
    ca, cb = (read_checkpoint(p / "checkpoint.pt").privacy for p in (ref, resumed.path))
    assert set(ca["audits"]) == set(cb["audits"])
    for name in ca["audits"]:
        assert same_bits(ca["audits"][name], cb["audits"][name]), name
    assert same_bits(ca["sent"], cb["sent"])
    return pa, ca["audits"]


#: the audits each resume test below runs; together, every audit fedsim registers
WITH_BN = ["mia", "client_mia", "client_membership", "leakage", "inversion"]
WITH_DP = ["canary_clients", "canary_samples"]
#: resumed on text data in tests/engine/test_text_runs.py
WITH_TEXT = ["exposure"]


def test_every_fedsim_audit_is_resumed_by_a_test_below():
    import fedsim.plugins  # noqa: F401  the audits register
    from fedsim.privacy.audits import AUDITS

    own = {n for n in AUDITS if AUDITS.get(n).__module__.startswith("fedsim.")}
    assert own == set(WITH_BN) | set(WITH_DP) | set(WITH_TEXT)


def test_resume_keeps_the_privacy_audit_captures(tmp_path):
    """Per-round MIA results, the client uploads audited in round 1, the clients that
    trained and the model inversion attacks were captured before the interruption: the
    checkpoint carries them, so the resumed run's captures and results are the
    uninterrupted run's, bit for bit."""
    audit = ["server.rounds=3", "partition.test_fraction=0.5", audits(*WITH_BN),
             "privacy.mia.every=1", "privacy.client_mia.round=1", "privacy.leakage.round=1",
             "model.norm=bn", "privacy.inversion.round=1", "privacy.inversion.steps=5",
             "privacy.inversion.batch=2"]
    p, captured = resume_audits(tmp_path, audit)
    assert [r["round"] for r in p["mia_by_round"]] == [1, 2, 3]
    assert p["client_mia"]["round"] == 1 and len(p["client_mia"]["per_client"]) == 3
    assert len(captured["leakage"]["rows"]) == 3 and captured["client_membership"]["trained"]
    assert set(captured["inversion"]["sent"]) and p["inversion"]["round"] == 1


def test_resume_keeps_the_canary_audits(tmp_path):
    """Canary clients (their running maxima, θ_0: strategy state) and gradient canaries'
    scores live in the checkpoint: a resumed run audits exactly as the uninterrupted one."""
    sets = ["server.rounds=3", "server.dp.kind=fixed", "server.dp.sampling=poisson",
            "model.norm=gn", "client.dp.noise_multiplier=0.5", audits(*WITH_DP),
            "privacy.canary_clients.count=12", "privacy.canary_samples.count=12"]
    p, captured = resume_audits(tmp_path, sets)
    assert p["canary_audit"]["rounds"] == 3
    assert p["sample_canary_audit"]["observed"] > 0
    assert np.isfinite(captured["canary_samples"]["best"]).any()


def test_resume_keeps_counting_dp_rounds(tmp_path):
    """The DP accountant composes every noised round, those before the interruption too."""
    dp = ["server.rounds=3", "server.dp.kind=fixed", "server.dp.noise_multiplier=0.8"]
    ref = fedsim.run("scenarios/quickstart.toml", TINY + dp, out=tmp_path / "ref").path
    resumed = fedsim.resume(interrupted_copy(ref, tmp_path / "resumed"))
    assert resumed.summary["resumed_from"] == [2]
    assert resumed.summary["dp"]["privacy_spent"]["rounds"] == 3
    assert_same_run(ref, resumed.path)


def test_resume_with_recalibrated_bn_statistics_equals_the_uninterrupted_run(tmp_path):
    """Recalibration keeps no state of its own (each round's queries depend on that round's
    global arrays and clients only): a resumed run is the uninterrupted one, bit for bit,
    rounds' bn_statistics records and summary included."""
    sc = TINY + ["server.rounds=3", "model.norm=bn", "server.bn_statistics=recalibrate"]
    ref = fedsim.run("scenarios/quickstart.toml", sc, out=tmp_path / "ref").path
    resumed = fedsim.resume(interrupted_copy(ref, tmp_path / "resumed"))
    assert resumed.summary["resumed_from"] == [2]
    assert resumed.summary["bn_statistics"]["rounds_applied"] == 3
    assert_same_run(ref, resumed.path)
