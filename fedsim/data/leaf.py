"""LEAF's FEMNIST (Caldas et al. 2018): 28x28 handwritten characters grouped by writer.

``data.root`` holds LEAF's ``train/*.json`` and ``test/*.json`` as written by
``leaf/data/femnist/preprocess.sh``; each file is ``{"users": [...], "num_samples": [...],
"user_data": {user: {"x": [[784 floats in 0..1], ...], "y": [labels 0..61]}}}``. Every
sample keeps its writer, so the ``natural`` partition can make each writer one client.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np

from fedsim.config import DataConfig
from fedsim.data.datasets import DATASETS, ArrayDataset, _root, _standardized
from fedsim.errors import DataFormatError

FEMNIST_CLASSES = 62  # digits 0-9, uppercase A-Z (10-35), lowercase a-z (36-61)
FEMNIST_PIXELS = 28 * 28
LEAF_FORMAT = ('LEAF json: {"users": [...], "num_samples": [...], "user_data": {user: '
               '{"x": [[784 floats in 0..1], ...], "y": [labels 0..61]}}}')

Split = tuple[np.ndarray, np.ndarray, list[str]]  # pixels (N, 784), labels (N,), writer per sample


@DATASETS.register("femnist")
def load_femnist(cfg: DataConfig, seed: int = 0) -> ArrayDataset:
    """FEMNIST from LEAF's json files in ``data.root/train`` and ``data.root/test``.

    LEAF stores gray levels / 255, so the white paper background is 1.0; the pixels are
    inverted (``1 - x``) to MNIST's convention of bright ink on a black background, then
    standardized like every dataset. The training files give the clients (``natural``:
    one writer each); the union of the test files is the global test set.
    """
    return _femnist_cached(cfg)


@functools.lru_cache(maxsize=1)
def _femnist_cached(cfg: DataConfig) -> ArrayDataset:
    root = _root(cfg, ["train/*.json", "test/*.json (LEAF's FEMNIST output)"])
    train_x, train_y, train_users = read_leaf_folder(root / "train")
    test_x, test_y, _ = read_leaf_folder(root / "test")
    writers = sorted(set(train_users))
    index = {w: i for i, w in enumerate(writers)}
    ds = _standardized("femnist", (1.0 - train_x).reshape(-1, 1, 28, 28), train_y,
                       (1.0 - test_x).reshape(-1, 1, 28, 28), test_y, scale=1.0,
                       num_classes=FEMNIST_CLASSES)
    train_writers = np.array([index[w] for w in train_users], dtype=np.int64)
    train_writers.flags.writeable = False
    return dataclasses.replace(ds, train_writers=train_writers, writers=tuple(writers))


def read_leaf_folder(folder: Path) -> Split:
    """All ``*.json`` files of one LEAF split folder, in file-name order; users unique."""
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise DataFormatError(
            f"femnist: folder {str(folder)!r} holds no *.json files; expected LEAF's "
            "FEMNIST output (leaf/data/femnist/preprocess.sh writes data/train/*.json and "
            "data/test/*.json; nothing is downloaded)"
        )
    xs, ys, users = [], [], []
    owner: dict[str, Path] = {}
    for path in files:
        x, y, file_users = read_leaf_file(path)
        for user in dict.fromkeys(file_users):
            if user in owner:
                raise DataFormatError(f"{path}: user {user!r} is also in {owner[user]}; "
                                      "expected each writer in one file of a split")
            owner[user] = path
        xs.append(x)
        ys.append(y)
        users += file_users
    return np.concatenate(xs), np.concatenate(ys), users


def read_leaf_file(path: Path) -> Split:
    """One LEAF json file as float32 pixels (N, 784), int64 labels and each sample's user."""
    try:
        blob = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{path}: not readable as json ({exc}); expected {LEAF_FORMAT}") \
            from None
    if not isinstance(blob, dict) or not {"users", "num_samples", "user_data"} <= blob.keys():
        found = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise DataFormatError(f"{path}: has {found}, missing 'users', 'num_samples' or "
                              f"'user_data'; expected {LEAF_FORMAT}")
    users, counts, data = blob["users"], blob["num_samples"], blob["user_data"]
    if not isinstance(users, list) or not isinstance(counts, list) or len(users) != len(counts):
        raise DataFormatError(f"{path}: 'users' and 'num_samples' are not lists of the same "
                              f"length; expected {LEAF_FORMAT}")
    xs, ys, owners = [], [], []
    for user, count in zip(users, counts):
        record = data.get(user) if isinstance(data, dict) else None
        if not isinstance(record, dict) or "x" not in record or "y" not in record:
            raise DataFormatError(f"{path}: user {user!r} has no 'x' and 'y' in 'user_data'; "
                                  f"expected {LEAF_FORMAT}")
        x, y = _user_arrays(path, user, record)
        if len(x) != len(y) or len(y) != count:
            raise DataFormatError(f"{path}: user {user!r} has {len(x)} images, {len(y)} "
                                  f"labels and num_samples {count}; expected them equal")
        xs.append(x)
        ys.append(y)
        owners += [str(user)] * len(y)
    if not xs:
        return np.zeros((0, FEMNIST_PIXELS), np.float32), np.zeros(0, np.int64), []
    return np.concatenate(xs), np.concatenate(ys), owners


def _user_arrays(path: Path, user: str, record: dict) -> tuple[np.ndarray, np.ndarray]:
    where = f"{path}: user {user!r}"
    try:
        x = np.asarray(record["x"], dtype=np.float32)
        y = np.asarray(record["y"])
    except (TypeError, ValueError) as exc:
        raise DataFormatError(f"{where}: 'x' is not a list of equal-length number lists "
                              f"({exc}); expected {LEAF_FORMAT}") from None
    if len(record["x"]) == 0:
        x = x.reshape(0, FEMNIST_PIXELS)
    if x.ndim != 2 or x.shape[1] != FEMNIST_PIXELS:
        raise DataFormatError(f"{where}: 'x' has shape {x.shape}; expected {FEMNIST_PIXELS} "
                              "pixels (28x28 flattened) per image")
    if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
        raise DataFormatError(f"{where}: pixels outside 0..1; expected {LEAF_FORMAT}")
    if y.ndim != 1 or (y.size and (y.dtype.kind not in "iu" or y.min() < 0
                                   or y.max() >= FEMNIST_CLASSES)):
        raise DataFormatError(f"{where}: 'y' is not a list of integer labels 0..61; "
                              f"expected {LEAF_FORMAT}")
    return x, y.astype(np.int64)
