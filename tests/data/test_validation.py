"""The validation split: carved from the training pool before partitioning, stratified,
fixed whatever the scenario seed, disjoint from every client and the test set; and off by
default, leaving every federation exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.arrays import model_to_record
from fedsim.client.train import evaluate
from fedsim.config import DataConfig, PartitionConfig, Scenario, ServerConfig, scenario_from_dict
from fedsim.context import RunContext
from fedsim.data.datasets import ArrayDataset, load_digits, load_synthetic
from fedsim.data.federated import FederatedData, _ArrayClients, _build
from fedsim.data.partition import split_clients
from fedsim.data.validation import carve, validation_size
from fedsim.errors import ScenarioError
from fedsim.rng import numpy_rng
from fedsim.server.evaluate import Evaluator


def _fresh(seed: int = 0, fraction: float = 0.0, data: DataConfig | None = None,
           **partition) -> FederatedData:
    data = data or DataConfig()
    data = DataConfig(**{**data.__dict__, "validation_fraction": fraction})
    return _build.__wrapped__(seed, data, PartitionConfig(**partition))


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.numpy().reshape(len(x), -1)}


def test_validation_is_a_stratified_fixed_fraction_of_the_training_pool():
    ds = load_digits(DataConfig())
    val, rest = carve(ds, 0.1)
    assert len(val) == validation_size(len(ds.train_y), 0.1) == 144  # round(0.1 * 1437)
    assert np.array_equal(np.sort(np.concatenate([val, rest])), np.arange(len(ds.train_y)))
    counts = np.bincount(ds.train_y[val], minlength=10)
    exact = np.bincount(ds.train_y, minlength=10) * 144 / len(ds.train_y)
    assert counts.sum() == 144 and (np.abs(counts - exact) < 1).all()  # per-class quotas
    again, _ = carve(ds, 0.1)
    assert np.array_equal(val, again)


def test_no_client_trains_or_tests_on_it_whatever_the_seed():
    for seed in (0, 7):
        fd = _fresh(seed, 0.1, kind="dirichlet", num_clients=10, alpha=0.5,
                    holdout_clients=0.2)
        vx, vy = fd.validation()
        assert len(vy) == 144
        clients = set()
        for cid in range(10):
            clients |= _rows(fd.client_train(cid)[0]) | _rows(fd.client_test(cid)[0])
        assert clients.isdisjoint(_rows(vx))
        assert _rows(fd.global_test()[0]).isdisjoint(_rows(vx))
        total = sum(len(fd.client_train(c)[1]) + len(fd.client_test(c)[1]) for c in range(10))
        assert total + 144 == 1437  # every other training image is some client's
        if seed == 0:
            first = vx.clone()
    assert torch.equal(first, vx)  # the same images under every scenario seed


def test_off_by_default_the_federation_is_exactly_as_without_the_option():
    """validation_fraction = 0: the partition of the whole pool, drawn as it always was."""
    partition = PartitionConfig(kind="dirichlet", num_clients=8, alpha=0.3)
    fd = _fresh(3, 0.0, **partition.__dict__)
    ds = load_digits(DataConfig())
    parts = split_clients(ds.train_y, partition, numpy_rng(3, "partition"),
                          what="the digits training split")
    before = FederatedData(_ArrayClients(ds, parts), partition, 3)
    for cid in range(8):
        for now, then in ((fd.client_train(cid), before.client_train(cid)),
                          (fd.client_test(cid), before.client_test(cid))):
            assert torch.equal(now[0], then[0]) and torch.equal(now[1], then[1])
    assert fd.validation() is None and not fd.has_validation


def test_evaluation_records_the_validation_split_only_when_held_out():
    def evaluated(fraction: float) -> tuple[dict, Evaluator, RunContext]:
        scn = scenario_from_dict({"data": {"validation_fraction": fraction},
                                  "partition": {"num_clients": 4},
                                  "server": {"clients_per_round": 2}, "model": {"width": 8}})
        run = RunContext.build(scn)
        model = run.new_model()
        ev = Evaluator(scn.output, scn.seed, run.data, model, torch.device("cpu"))
        return ev(model_to_record(model)), ev, run

    off, ev_off, _ = evaluated(0.0)
    assert "validation_accuracy" not in off and len(ev_off._all_splits()) == 1 + 2 * 4
    on, _, run = evaluated(0.25)
    loss, acc, n = evaluate(run.new_model(), *run.data.validation())
    assert (on["validation_loss"], on["validation_accuracy"]) == pytest.approx((loss, acc))
    assert n == round(0.25 * 1437)


def test_synthetic_validation_is_its_own_stream():
    cfg = DataConfig(name="synthetic", test_samples=200, validation_fraction=0.25)
    fd = _build.__wrapped__(4, cfg, PartitionConfig(num_clients=5))
    vx, vy = fd.validation()
    assert len(vy) == 50  # round(0.25 * test_samples)
    assert _rows(vx).isdisjoint(_rows(fd.global_test()[0]))
    assert _rows(vx).isdisjoint(_rows(fd.client_train(0)[0]))
    x, y = load_synthetic(cfg, 4).validation_set(50)
    assert np.array_equal(vx.numpy(), x) and np.array_equal(vy.numpy(), y)
    assert torch.equal(_fresh(4, 0.25, cfg, num_clients=5).validation()[0], vx)


def test_writers_lose_their_share_and_keep_the_rest():
    """Data with writers (LEAF) is carved like any pool, stratified by label; the natural
    partition then gives each writer what is left of its samples."""
    labels = np.tile(np.arange(6), 2)
    writers = np.repeat([0, 1], 6)  # two writers, one sample of each class 0..5 each
    x = np.arange(12, dtype=np.float32).reshape(12, 1, 1, 1)
    ds = ArrayDataset("w", x, labels, x[:1], labels[:1], 6, (1, 1, 1),
                      train_writers=writers, writers=("a", "b"))
    source = _ArrayClients.partitioned(ds, PartitionConfig(kind="natural", num_clients=2),
                                       seed=0, validation_fraction=0.34)
    val = source.validation
    assert len(val) == 4 and sorted(labels[val].tolist()) == [0, 1, 2, 3]  # round(0.34 * 12)
    for w, part in enumerate(source.parts):
        assert set(writers[part]) == {w} and set(part).isdisjoint(val)
    assert sorted(np.concatenate([val, *source.parts]).tolist()) == list(range(12))


def test_a_bad_fraction_names_the_key():
    with pytest.raises(ScenarioError, match=r"data.validation_fraction = 1.0 is out of range"):
        scenario_from_dict({"data": {"validation_fraction": 1.0}})
    with pytest.raises(ScenarioError, match="data.validation_fraction = -0.1"):
        Scenario(data=DataConfig(validation_fraction=-0.1), server=ServerConfig())


@pytest.mark.parametrize("clients", [10, 20])
def test_one_class_per_client_on_mnist5k_with_a_validation_split(clients):
    """Hsieh et al.'s extreme skew: shards of one class each. mnist5k's pool stays balanced
    after the stratified carve (360 images per class), so every shard is one class."""
    fd = _fresh(0, 0.1, DataConfig(name="mnist5k"), kind="shards", shards_per_client=1,
                num_clients=clients)
    for cid in range(clients):
        train, test = fd.class_counts(cid)
        assert sum(1 for a, b in zip(train, test) if a + b) == 1
    assert len(fd.validation()[1]) == 400
