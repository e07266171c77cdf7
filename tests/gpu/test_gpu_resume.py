"""On the GPU, a seed gives the same run twice, and a run interrupted after round k and
resumed equals the uninterrupted one, bit for bit (as tests/resilience/test_resume.py checks
on the CPU)."""

import signal

import pytest
from same_run import assert_same_run  # tests/same_run.py

import fedsim
from fedsim.interrupt import Interrupted

K = 2  # interrupted once round K+1 is recorded, before its checkpoint: resumes from round K
# FedBN with BN: every client keeps its BN layers in Context.state, which the checkpoint
# carries; 8 clients, 3 per round over 4 rounds, so some client trains again after the resume
RUN = ["server.rounds=4", "partition.num_clients=8", "server.clients_per_round=3",
       "partition.holdout_clients=0.0", "model.width=8", "client.epochs=1", "model.norm=bn",
       "server.strategy=fedbn"]
ENGINES = {"sequential": [], "vectorized": ["engine.vectorize=true", "engine.cohort_size=2"]}


@pytest.mark.parametrize("engine", ENGINES)
def test_a_seed_gives_the_same_run_twice_on_the_device(tmp_path, on_device, engine):
    """Without this, resume could not be exact: no kernel on the path may be
    nondeterministic (e.g. atomics in a backward pass)."""
    args = RUN + ENGINES[engine] + on_device
    a = fedsim.run("scenarios/quickstart.toml", args, out=tmp_path / "a").path
    b = fedsim.run("scenarios/quickstart.toml", args, out=tmp_path / "b").path
    assert_same_run(a, b)


@pytest.mark.parametrize("engine", ENGINES)
def test_interrupted_after_round_k_and_resumed_equals_the_uninterrupted_run(
        tmp_path, on_device, engine):
    args = RUN + ENGINES[engine] + on_device
    ref = fedsim.run("scenarios/quickstart.toml", args, out=tmp_path / "ref").path

    def stop(record):  # called once a round is recorded, before its checkpoint is written
        if record.get("round") == K + 1:
            raise Interrupted(signal.SIGINT)

    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        fedsim.run("scenarios/quickstart.toml", args, out=cut, progress=stop)
    assert not (cut / "summary.json").exists()
    resumed = fedsim.resume(cut)
    assert resumed.summary["resumed_from"] == [K]
    assert_same_run(ref, resumed.path)
