"""FederatedData: holdout clients, local splits, feature domains, synthetic clients, report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedsim.config import DataConfig, PartitionConfig, Scenario, ServerConfig
from fedsim.data import build_federated_data, partition_table, plot_class_counts
from fedsim.data.datasets import SyntheticDataset
from fedsim.data.domains import apply_domain
from fedsim.data.federated import FederatedData, _build, _SyntheticClients
from fedsim.errors import ScenarioError


def _scenario(seed=0, data=None, **partition) -> Scenario:
    return Scenario(seed=seed, data=data or DataConfig(), partition=PartitionConfig(**partition),
                    server=ServerConfig(clients_per_round=1))


def _fresh(scenario: Scenario) -> FederatedData:
    """Bypass the per-process cache, as a new process would."""
    return _build.__wrapped__(scenario.seed, scenario.data, scenario.partition)


def test_holdout_clients_are_seeded_and_disjoint_from_participating():
    fd = build_federated_data(_scenario(num_clients=20, holdout_clients=0.25))
    assert len(fd.holdout) == 5 and fd.participating == tuple(sorted(fd.participating))
    assert set(fd.holdout).isdisjoint(fd.participating)
    assert set(fd.holdout) | set(fd.participating) == set(range(20))
    assert fd.holdout == _fresh(_scenario(num_clients=20, holdout_clients=0.25)).holdout
    assert fd.holdout != build_federated_data(_scenario(1, num_clients=20,
                                                        holdout_clients=0.25)).holdout
    assert build_federated_data(_scenario(num_clients=20)).holdout == ()


def test_build_is_cached_per_data_partition_and_seed():
    s = _scenario(num_clients=7)
    assert build_federated_data(s) is build_federated_data(_scenario(num_clients=7))
    assert build_federated_data(s) is not build_federated_data(_scenario(1, num_clients=7))


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_local_split_respects_test_fraction(fraction):
    fd = build_federated_data(_scenario(num_clients=30, kind="quantity", sigma=1.5,
                                        test_fraction=fraction))
    total = 0
    for cid in range(fd.num_clients):
        (xtr, ytr), (_, yte) = fd.client_train(cid), fd.client_test(cid)
        n = len(ytr) + len(yte)
        assert len(yte) == min(max(1, math.floor(fraction * n + 0.5)), n - 1) and len(ytr) >= 1
        assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
        assert xtr.shape[1:] == fd.input_shape and len(xtr) == fd.client_size(cid)
        train, test = fd.class_counts(cid)
        assert train == torch.bincount(ytr, minlength=10).tolist()
        assert test == torch.bincount(yte, minlength=10).tolist()
        total += n
    assert total == 1437  # every digits training image belongs to exactly one client


def test_client_tensors_are_built_once_and_reused():
    fd = build_federated_data(_scenario(num_clients=5))
    assert fd.client_train(2)[0] is fd.client_train(2)[0]
    assert fd.global_test()[0] is fd.global_test()[0]
    with pytest.raises(IndexError, match="client id 5 is out of range 0..4"):
        fd.client_train(5)


def test_feature_partition_transforms_each_clients_train_and_test_data():
    plain = build_federated_data(_scenario(num_clients=8))
    s = _scenario(num_clients=8, kind="feature", label_kind="iid",
                  transforms=("rotate", "contrast", "noise", "invert", "blur"))
    fd = build_federated_data(s)
    again = _fresh(s)
    for cid in range(8):
        for get in ("client_train", "client_test"):
            (x, y), (x0, y0) = getattr(fd, get)(cid), getattr(plain, get)(cid)
            assert torch.equal(y, y0)  # same label partition and split as plain iid
            assert not torch.allclose(x, x0)
            torch.testing.assert_close(x, getattr(again, get)(cid)[0], rtol=0, atol=0)
    x_all = np.concatenate([plain.client_train(3)[0].numpy(), plain.client_test(3)[0].numpy()])
    assert fd.domain(3)[0] == "invert"
    np.testing.assert_array_equal(fd.client_train(3)[0].numpy(), -plain.client_train(3)[0])
    assert apply_domain(x_all, s.partition, 0, 3).shape == x_all.shape
    # the global test set measures the shared task: it is never transformed
    assert torch.equal(fd.global_test()[0], plain.global_test()[0])
    assert plain.domain(3) is None


def test_too_many_clients_fails_before_training_and_names_the_dataset():
    with pytest.raises(ScenarioError, match=r"partition.num_clients = 1000 but the digits "
                       r"training split has only 1437 samples.*<= 718"):
        build_federated_data(_scenario(num_clients=1000))


def test_bad_names_are_scenario_errors():
    with pytest.raises(ScenarioError, match="partition.transforms = 'rotat'.*did you mean"):
        build_federated_data(_scenario(kind="feature", transforms=("rotat",)))
    with pytest.raises(ScenarioError, match="partition.transforms is empty"):
        build_federated_data(_scenario(kind="feature", transforms=()))
    with pytest.raises(ScenarioError, match="shards_per_client = 12 exceeds data.num_classes"):
        build_federated_data(_scenario(data=DataConfig(name="synthetic"), kind="shards",
                                       shards_per_client=12))


# --------------------------------------------------------------------------- synthetic


SYNTH = DataConfig(name="synthetic", samples_per_client=20, test_samples=50)


def test_synthetic_clients_depend_only_on_seed_and_client_id():
    s = _scenario(data=SYNTH, num_clients=10_000, kind="dirichlet", alpha=0.3)
    first = _fresh(s)
    x, y = first.client_train(9_999)
    other = _fresh(s)
    for cid in (0, 1, 5000):  # generate other clients first: client 9,999 must not change
        other.client_train(cid)
    torch.testing.assert_close(other.client_train(9_999), (x, y), rtol=0, atol=0)
    assert first.client_size(9_999) == 16 and x.shape == (16, 1, 8, 8)
    different = _fresh(_scenario(1, data=SYNTH, num_clients=10_000, kind="dirichlet", alpha=0.3))
    assert not torch.allclose(different.client_train(9_999)[0], x)
    assert first.global_test()[0].shape == (50, 1, 8, 8)


def test_synthetic_clients_are_held_in_a_bounded_cache():
    s = _scenario(data=SYNTH, num_clients=50, kind="shards", shards_per_client=2)
    dataset = SyntheticDataset(s.data, s.seed)
    fd = FederatedData(_SyntheticClients(dataset, s.data, s.partition, 0), s.partition, 0,
                       cache_clients=3)
    x0 = fd.client_train(0)[0]
    for cid in range(10):
        fd.client_train(cid)
        assert sum(c > 0 for c in fd.class_counts(cid)[0]) <= 2
    assert len(fd._clients) == 3
    torch.testing.assert_close(fd.client_train(0)[0], x0, rtol=0, atol=0)


def test_synthetic_cache_is_sized_by_bytes_not_by_client_count():
    from fedsim.data.federated import SYNTHETIC_CACHE_BYTES, synthetic_cache_clients

    small = DataConfig(name="synthetic", samples_per_client=40, image_size=8, channels=1)
    big = DataConfig(name="synthetic", samples_per_client=500, image_size=32, channels=3)
    n_small = synthetic_cache_clients(small, (1, 8, 8))
    n_big = synthetic_cache_clients(big, (3, 32, 32))
    assert n_small >= 10_000  # a whole thousand_clients federation stays generated
    assert n_small * 40 * 64 * 4 <= SYNTHETIC_CACHE_BYTES
    assert 16 <= n_big < 100 and n_big * 500 * 3 * 32 * 32 * 4 <= SYNTHETIC_CACHE_BYTES


# --------------------------------------------------------------------------- report


def test_partition_table_is_json_ready():
    fd = build_federated_data(_scenario(num_clients=6, holdout_clients=0.34, kind="dirichlet"))
    rows = json.loads(json.dumps(partition_table(fd)))
    assert [r["client"] for r in rows] == list(range(6))
    assert [r["client"] for r in rows if r["holdout"]] == list(fd.holdout)
    assert sum(sum(r["train_counts"]) + sum(r["test_counts"]) for r in rows) == 1437
    assert set(rows[0]) == {"client", "train_counts", "test_counts", "holdout"}


@pytest.mark.parametrize("clients", [12, 250])
def test_plot_class_counts_writes_a_png(tmp_path, clients):
    fd = build_federated_data(_scenario(data=SYNTH, num_clients=clients, holdout_clients=0.1))
    path = plot_class_counts(fd, tmp_path / "plots" / "counts.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
