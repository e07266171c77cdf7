"""LEAF FEMNIST files and the natural partition: one client per writer, caps, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from fedsim.config import DataConfig, PartitionConfig, Scenario, ServerConfig
from fedsim.data.federated import _build
from fedsim.data.leaf import FEMNIST_PIXELS, load_femnist
from fedsim.data.partition import split_clients
from fedsim.errors import DataFormatError, ScenarioError
from fedsim.rng import numpy_rng

# writer → labels; every pixel of a writer's image i is (writer number * 10 + i) / 100, so a
# client's samples can be traced back to the writer that wrote them.
TRAIN = {"w_b": [1, 2, 3], "w_a": [0, 61, 5, 7], "w_c": [9, 9]}
TEST = {"w_a": [4], "w_c": [8, 10]}


def _pixels(writer: str, i: int) -> list[float]:
    return [("abc".index(writer[-1]) * 10 + i) / 100] * FEMNIST_PIXELS


def _leaf(users: dict[str, list[int]]) -> dict:
    return {"users": list(users), "num_samples": [len(y) for y in users.values()],
            "user_data": {u: {"x": [_pixels(u, i) for i in range(len(y))], "y": y}
                          for u, y in users.items()}}


def _write(root: Path, train=TRAIN, test=TEST) -> Path:
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    # two training files, as LEAF writes at most 100 writers per file
    first = {u: y for u, y in train.items() if u != "w_c"}
    rest = {u: y for u, y in train.items() if u == "w_c"}
    (root / "train" / "all_data_0_train.json").write_text(json.dumps(_leaf(first)))
    (root / "train" / "all_data_1_train.json").write_text(json.dumps(_leaf(rest)))
    (root / "test" / "all_data_0_test.json").write_text(json.dumps(_leaf(test)))
    return root


def _cfg(root: Path) -> DataConfig:
    return DataConfig(name="femnist", root=str(root))


def _scenario(root: Path, **partition) -> Scenario:
    return Scenario(data=_cfg(root), partition=PartitionConfig(kind="natural", **partition),
                    server=ServerConfig(clients_per_round=1))


def test_femnist_reads_every_file_keeps_writers_and_inverts_pixels(tmp_path):
    ds = load_femnist(_cfg(_write(tmp_path)))
    assert ds.train_x.shape == (9, 1, 28, 28) and ds.test_x.shape == (3, 1, 28, 28)
    assert ds.num_classes == 62 and ds.input_shape == (1, 28, 28)
    assert ds.writers == ("w_a", "w_b", "w_c")
    # files in name order, users in file order: w_b, w_a (file 0), then w_c (file 1)
    assert ds.train_y.tolist() == [1, 2, 3, 0, 61, 5, 7, 9, 9]
    assert ds.train_writers.tolist() == [1, 1, 1, 0, 0, 0, 0, 2, 2]
    assert ds.test_y.tolist() == [4, 8, 10]
    raw = ds.train_x[:, 0, 0, 0] * ds.std + ds.mean  # back to the inverted [0, 1] pixels
    expected = [1 - p / 100 for p in [10, 11, 12, 0, 1, 2, 3, 20, 21]]
    np.testing.assert_allclose(raw, expected, atol=1e-6)
    assert abs(ds.train_x.mean()) < 1e-5


def test_natural_partition_makes_one_client_per_writer(tmp_path):
    scenario = _scenario(_write(tmp_path), num_clients=3, test_fraction=0.4)
    fd = _build.__wrapped__(0, scenario.data, scenario.partition)
    ds = load_femnist(_cfg(tmp_path))
    assert fd.num_clients == 3
    for cid, (writer, labels) in enumerate(sorted(TRAIN.items())):
        (xtr, ytr), (xte, yte) = fd.client_train(cid), fd.client_test(cid)
        assert sorted(ytr.tolist() + yte.tolist()) == sorted(labels), writer
        assert len(yte) == max(1, round(0.4 * len(labels)))
        own = ds.train_x[ds.train_writers == ds.writers.index(writer)]
        both = np.concatenate([xtr.numpy(), xte.numpy()])
        assert sorted(both[:, 0, 0, 0].tolist()) == sorted(own[:, 0, 0, 0].tolist())


def test_natural_ignores_the_scenario_seed(tmp_path):
    labels = np.zeros(9, dtype=np.int64)
    writers = np.array([1, 1, 1, 0, 0, 0, 0, 2, 2])
    cfg = PartitionConfig(kind="natural", num_clients=3)
    a = split_clients(labels, cfg, numpy_rng(0, "partition"), writers=writers)
    b = split_clients(labels, cfg, numpy_rng(5, "partition"), writers=writers)
    assert [p.tolist() for p in a] == [p.tolist() for p in b] == [[3, 4, 5, 6], [0, 1, 2], [7, 8]]


def test_max_clients_keeps_a_fixed_nested_subset_of_writers():
    writers = np.repeat(np.arange(50), 2)  # 50 writers of 2 samples each
    labels = np.zeros(100, dtype=np.int64)

    def chosen(cap: int, seed: int = 0) -> list[int]:
        cfg = PartitionConfig(kind="natural", num_clients=cap, max_clients=cap)
        parts = split_clients(labels, cfg, numpy_rng(seed, "partition"), writers=writers)
        assert all(len(set(writers[p])) == 1 and len(p) == 2 for p in parts)
        return [int(writers[p[0]]) for p in parts]

    ten = chosen(10)
    assert len(ten) == 10 and ten == sorted(ten) and ten == chosen(10, seed=7)
    assert ten != list(range(10))  # a fixed random draw, not the first ids
    assert set(ten) <= set(chosen(20))
    expected = np.sort(numpy_rng(0, "natural", "writers").permutation(50)[:10]).tolist()
    assert ten == expected
    assert chosen(50) == list(range(50))  # a cap of at least the writers keeps them all
    cfg = PartitionConfig(kind="natural", num_clients=50, max_clients=80)
    assert len(split_clients(labels, cfg, numpy_rng(0, "p"), writers=writers)) == 50


def test_natural_num_clients_must_match_the_writers(tmp_path):
    root = _write(tmp_path)
    with pytest.raises(ScenarioError, match=r"has 3 writers and uses all of them .* so 3 "
                       r"clients, but partition.num_clients = 2; set partition.num_clients = 3"
                       r", or partition.max_clients = 2"):
        _build.__wrapped__(0, _cfg(root), PartitionConfig(kind="natural", num_clients=2))
    fd = _build.__wrapped__(0, _cfg(root), PartitionConfig(kind="natural", num_clients=2,
                                                           max_clients=2))
    assert fd.num_clients == 2


def test_natural_needs_a_dataset_with_writers():
    with pytest.raises(ScenarioError, match="the digits training split records no writers; "
                       r"use a dataset that does \(data.name = 'femnist'\)"):
        _build.__wrapped__(0, DataConfig(name="digits"),
                           PartitionConfig(kind="natural", num_clients=3))
    with pytest.raises(ScenarioError, match="'synthetic' generates clients and has no writers"):
        _build.__wrapped__(0, DataConfig(name="synthetic"),
                           PartitionConfig(kind="natural", num_clients=3))
    with pytest.raises(ScenarioError, match="partition.label_kind = 'natural' is out of range"):
        PartitionConfig(kind="feature", label_kind="natural")
    with pytest.raises(ScenarioError, match="partition.max_clients = -1 is out of range"):
        PartitionConfig(max_clients=-1)


def test_natural_writer_with_one_sample_is_an_error():
    cfg = PartitionConfig(kind="natural", num_clients=2)
    with pytest.raises(ScenarioError, match=r"writer #1 \(in sorted user-id order\) has fewer "
                       "than 2 samples"):
        split_clients(np.zeros(4, np.int64), cfg, numpy_rng(0, "p"),
                      writers=np.array([0, 0, 0, 1]))


def _bad(tmp_path: Path, blob) -> str:
    root = _write(tmp_path)
    path = root / "train" / "all_data_1_train.json"
    path.write_text(blob if isinstance(blob, str) else json.dumps(blob))
    with pytest.raises(DataFormatError) as err:
        load_femnist(_cfg(root))
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    return message


@pytest.mark.parametrize("blob, match", [
    ("{not json", "not readable as json"),
    ({"users": ["w_c"], "user_data": {}}, "missing 'users', 'num_samples' or 'user_data'"),
    ({"users": ["w_c"], "num_samples": [2], "user_data": {}}, "user 'w_c' has no 'x' and 'y'"),
    ({"users": ["w_c"], "num_samples": [2],
      "user_data": {"w_c": {"x": [[0.5] * 784] * 2, "y": [1]}}},
     "user 'w_c' has 2 images, 1 labels and num_samples 2"),
    ({"users": ["w_c"], "num_samples": [1], "user_data": {"w_c": {"x": [[0.5] * 783], "y": [1]}}},
     r"'x' has shape \(1, 783\); expected 784 pixels"),
    ({"users": ["w_c"], "num_samples": [1], "user_data": {"w_c": {"x": [[2.0] * 784], "y": [1]}}},
     "pixels outside 0..1"),
    ({"users": ["w_c"], "num_samples": [1], "user_data": {"w_c": {"x": [[0.5] * 784], "y": [62]}}},
     "'y' is not a list of integer labels 0..61"),
    (_leaf({"w_a": [1, 2]}), "user 'w_a' is also in .*all_data_0_train.json"),
])
def test_bad_leaf_files_name_the_file(tmp_path, blob, match):
    assert re.search(match, _bad(tmp_path, blob))


def test_missing_leaf_folders_are_named(tmp_path):
    with pytest.raises(DataFormatError, match="data.root is empty; femnist needs"):
        load_femnist(DataConfig(name="femnist"))
    (tmp_path / "train").mkdir()
    with pytest.raises(DataFormatError, match=r"train' holds no \*.json files; expected LEAF"):
        load_femnist(_cfg(tmp_path))
