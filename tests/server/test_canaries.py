"""Canary clients (Andrew et al. 2024) around a strategy, and gradient canaries in DP-SGD
(Steinke et al. 2023): what they insert, and their audits beside the accountants."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

import fedsim
from fedsim import canaries, compat
from fedsim.engine.inprocess import set_task_identity
from fedsim.models.dp_sgd import canary_gradients
from fedsim.server.canaries import CanaryClients

QUICK = "scenarios/quickstart.toml"
TINY = ["server.rounds=3", "partition.num_clients=10", "server.clients_per_round=4",
        "partition.holdout_clients=0.0", "client.epochs=1", "model.width=8"]


def reply(w: np.ndarray, n: int, node: int) -> Message:
    set_task_identity(1)
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    compat.set_message_id(instruction, f"m{node}")
    content = RecordDict({"arrays": ArrayRecord({"w": Array(w), "stat": Array(np.ones(1))}),
                          "metrics": MetricRecord({"num-examples": n, "train_loss": 2.0})})
    return Message(content, reply_to=instruction)


def test_in_canaries_answer_with_a_move_along_their_direction():
    """Rate 1: every in canary takes part; each answers with the global plus s·c_i and counts
    as an average client, so FedAvg's mean over 2 real + k canaries is exact."""
    base = np.array([1.0, -1.0, 0.5, 2.0])
    wrapper = CanaryClients(FedAvg(), ["w"], count=6, rate=1.0, seed=0, norm=0.5)
    wrapper._global = ArrayRecord({"w": Array(base), "stat": Array(np.zeros(1))})
    real = [reply(base + 1.0, 10, 1), reply(base - 1.0, 30, 2)]
    arrays, metrics = wrapper.aggregate_train(1, real)
    ins = np.flatnonzero(wrapper.included)
    dirs = canaries.unit_directions(4, 0, canaries.CLIENT, ins)
    k = len(ins)
    assert 0 < k < 6  # the fixture has canaries in and out
    expected = (10 * (base + 1) + 30 * (base - 1) + 20 * (k * base + 0.5 * dirs.sum(0))) / (
        40 + 20 * k)  # each canary weighs the real mean, 20 examples
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-6)
    assert metrics["train_loss"] == pytest.approx(2.0)  # the mean over clients is unchanged
    assert wrapper.participations.tolist() == wrapper.included.astype(int).tolist()
    assert np.isfinite(wrapper.best).all() and wrapper.rounds == 1


def test_gradient_canaries_join_the_step_at_the_sampling_rate():
    params = {"a": torch.zeros(2, 2), "b": torch.zeros(3)}
    dirs = torch.as_tensor(canaries.unit_directions(7, 0, canaries.SAMPLE, [0, 1, 2]))
    gen = torch.Generator().manual_seed(0)
    every = canary_gradients(dirs, params, 1.0, 2.0, gen)
    flat = torch.cat([every["a"].ravel(), every["b"]])
    torch.testing.assert_close(flat, 2.0 * dirs.sum(0))
    assert canary_gradients(dirs, params, 0.0, 2.0, gen)["b"].abs().sum() == 0


def test_owners_and_bits_are_derived_and_only_participants_hold_canaries():
    owners = canaries.owners(500, [2, 5, 9], seed=3)
    assert set(owners) == {2, 5, 9}
    held = canaries.held_by(5, 500, [2, 5, 9], seed=3)
    bits = canaries.included(500, 3, canaries.SAMPLE)
    assert np.array_equal(held, np.flatnonzero((owners == 5) & bits))
    assert 200 < bits.sum() < 300


def test_canary_clients_audit_beside_the_accountant(tmp_path):
    result = fedsim.run(QUICK, [*TINY, "server.dp.kind=fixed", "server.dp.noise_multiplier=2.0",
                                'privacy.audits=["canary_clients"]',
                                "privacy.canary_clients.count=30"], out=tmp_path / "r")
    audit = result.summary["privacy"]["canary_audit"]
    spent = result.summary["dp"]["privacy_spent"]
    assert audit["accountant"]["epsilon"] == spent["epsilon"]
    assert audit["accountant"]["relation"] == "replace_one" and audit["unit"] == "client"
    # a canary's own mechanism: Poisson at q = 4/10 over the 3 released rounds, add/remove
    assert audit["canary_epsilon"] == pytest.approx(fedsim.privacy.accountant.epsilon(
        2.0, 0.4, 3, 1e-5).value)
    assert audit["update_norm"] == {"min": 1.0, "max": 1.0}  # the clipping norm
    for view in ("all_iterates", "final_model"):
        bound = audit[view]["lower_bound"]
        assert bound["confidence"] == 0.95 and bound["canaries"] == 30
        assert 0 <= bound["epsilon_lower_bound"] <= audit["canary_epsilon"]
        assert "not a bound" in audit[view]["estimate"]["what"]
    rounds = [json.loads(x) for x in (result.path / "rounds.jsonl").read_text().splitlines()]
    assert all(c >= 0 for r in rounds[1:] for c in r["clients"])  # canaries are no clients


def test_gradient_canaries_audit_dp_sgd_from_the_uploads(tmp_path):
    result = fedsim.run(QUICK, [*TINY, "server.rounds=2", "client.dp.noise_multiplier=1.0",
                                'privacy.audits=["canary_samples"]',
                                "privacy.canary_samples.count=40"], out=tmp_path / "r")
    audit = result.summary["privacy"]["sample_canary_audit"]
    eps = result.summary["client_dp"]["epsilon"]["max"]
    assert audit["accountant"] == {"epsilon": eps, "delta": 1e-5, "from": "client_dp.epsilon.max"}
    assert audit["unit"] == "sample" and audit["canaries"] == 40 and audit["observed"] > 0
    assert 0 <= audit["lower_bound"]["epsilon_lower_bound"] <= eps


def test_gradient_canaries_need_dp_sgd():
    with pytest.raises(fedsim.ScenarioError, match="names 'canary_samples', which needs DP-SGD"):
        fedsim.run(QUICK, [*TINY, 'privacy.audits=["canary_samples"]'])
