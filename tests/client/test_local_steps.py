"""``client.local_steps``: exactly N SGD steps per round, for every batch size and backend."""

import json

import pytest
import torch

import fedsim
from fedsim.client.train import plan_batches, train_local
from fedsim.config import ClientConfig, ScenarioError, load_scenario
from fedsim.models import build_model


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("n", [1, 5, 13, 40])
@pytest.mark.parametrize("drop", [True, False])
def test_plan_has_exactly_local_steps_batches_cycling_the_data(batch_size, n, drop):
    steps = 11
    cfg = ClientConfig(local_steps=steps, batch_size=batch_size, epochs=3)
    plan = plan_batches(n, cfg, torch.Generator().manual_seed(0), drop_singleton=drop)
    if drop and batch_size == 1 and n > 1:  # batch statistics need two samples: no step
        assert plan == []
        return
    assert len(plan) == steps
    assert all(1 <= len(idx) <= batch_size for idx in plan)
    # the batches are consecutive shuffled passes over the data: each full pass covers every
    # sample once (a dropped trailing singleton excepted)
    flat = torch.cat(plan).tolist()
    per_pass = n - (1 if drop and n > 1 and n % batch_size == 1 else 0)
    for start in range(0, len(flat) - per_pass + 1, per_pass):
        chunk = flat[start:start + per_pass]
        assert len(set(chunk)) == per_pass


def test_plan_equals_epochs_when_local_steps_is_zero():
    """local_steps = 0 keeps the epoch plan; the same generator draws the same shuffles, so
    the first epoch's batches are the step plan's first batches."""
    g = torch.Generator().manual_seed(3)
    epochs = plan_batches(21, ClientConfig(epochs=2, batch_size=8), g)
    assert [len(i) for i in epochs] == [8, 8, 5] * 2
    steps = plan_batches(21, ClientConfig(local_steps=4, batch_size=8),
                         torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(steps, epochs[:4]))


def test_empty_client_has_no_steps():
    assert plan_batches(0, ClientConfig(local_steps=5), torch.Generator()) == []


@pytest.mark.parametrize("batch_size", [2, 4, 16, 64])
def test_train_local_takes_exactly_local_steps(batch_size):
    torch.manual_seed(0)
    model = build_model("cnn", "gn", in_channels=1, image_size=8, num_classes=10, width=8,
                        groups=4)
    x, y = torch.randn(13, 1, 8, 8), torch.randint(0, 10, (13,))
    res = train_local(model, x, y, ClientConfig(local_steps=9, batch_size=batch_size),
                      torch.Generator().manual_seed(0))
    assert res.steps == 9


def test_negative_local_steps_is_refused():
    with pytest.raises(ScenarioError, match="client.local_steps"):
        ClientConfig(local_steps=-1)
    with pytest.raises(ScenarioError, match="client.local_steps"):
        load_scenario("scenarios/quickstart.toml", ["client.local_steps=-3"])


TINY = ["server.rounds=2", "partition.num_clients=6", "server.clients_per_round=4",
        "partition.holdout_clients=0.0", "model.width=8", "output.eval_clients=2",
        "model.norm=ln", "client.local_steps=7"]


@pytest.mark.parametrize("batch_size", [4, 32])
def test_runs_record_exactly_local_steps_sequential_and_vectorized(tmp_path, batch_size):
    """Whole runs at two batch sizes: every client takes 7 steps, rounds.jsonl says so, and
    the vectorized cohort ends where the sequential client does."""
    over = TINY + [f"client.batch_size={batch_size}"]
    a = fedsim.run("scenarios/quickstart.toml", over, out=tmp_path / "seq")
    b = fedsim.run("scenarios/quickstart.toml", over + ["engine.vectorize=true",
                                                        "engine.cohort_size=3"],
                   out=tmp_path / "vec")
    for res in (a, b):
        rounds = [json.loads(line) for line in (res.path / "rounds.jsonl").read_text()
                  .splitlines()]
        assert [r["local_steps"] for r in rounds if r["round"] >= 1] == [
            {"min": 7, "mean": 7.0, "max": 7, "total": 28}] * 2
    sa = torch.load(a.path / "model.pt", weights_only=True)
    sb = torch.load(b.path / "model.pt", weights_only=True)
    # 14 SGD steps per client in float32: summation-order differences stay far below this
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)
