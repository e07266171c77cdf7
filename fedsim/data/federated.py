"""FederatedData: one scenario's dataset + partition as per-client train/test tensors.

This is what the client app trains on, the server evaluates on and the privacy attacks
probe. Everything is derived from ``(seed, data, partition)``: the partition, each client's
local train/test split, the holdout clients and (for ``feature``) each client's domain.
Client tensors are built on first use and kept in a bounded LRU, so memory follows the
clients in use, not the size of the federation. Which clients are held out is a rule, not
a list (``data/population.py``): per client from ``(seed, cid)`` for generated populations,
the original seeded permutation for dataset-backed ones (so their runs are unchanged).
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol, TypeVar

import numpy as np
import torch

from fedsim.config import DataConfig, ExposureConfig, PartitionConfig, Scenario
from fedsim.data import synthetic_cohort
from fedsim.data.datasets import DATASETS, ArrayDataset, SyntheticDataset, load_dataset
from fedsim.data.domains import DOMAINS, apply_domain, client_domain
from fedsim.data.partition import CLIENT_LABELS, PARTITIONS, split_clients
from fedsim.data.population import ClientIds, Population, make_population
from fedsim.data.validation import carve, validation_size
from fedsim.errors import ScenarioError
from fedsim.rng import numpy_rng

Tensors = tuple[torch.Tensor, torch.Tensor]
V = TypeVar("V")

ARRAY_CACHE_CLIENTS = 4096  # client tensors partition the dataset, so this is bounded anyway
SYNTHETIC_CACHE_BYTES = 256 * 2**20  # generated clients kept for reuse (regenerating costs
# more than a small client's local training); memory stays bounded at any number of clients
LABEL_CACHE_CLIENTS = 1 << 17  # generated clients' labels kept (8 bytes per sample each)

#: dataset type → ``(dataset, data, partition, seed, exposure=...) -> FederatedData`` for
#: datasets whose clients are not index sets of one array (a text corpus: clients are
#: speaking roles), filled by the module that defines the dataset type
#: (``fedsim.data.shakespeare``); ``exposure``: the canaries to plant, or None
FEDERATIONS: dict[type, Callable[..., FederatedData]] = {}


def check_data_config(data: DataConfig, partition: PartitionConfig) -> None:
    """Check every registry name in ``[data]`` and ``[partition]`` without loading data."""
    DATASETS.get(data.name, key="data.name")
    PARTITIONS.get(partition.kind, key="partition.kind")
    label_kind = partition.kind
    if partition.kind == "feature":
        label_kind = partition.label_kind
        PARTITIONS.get(label_kind, key="partition.label_kind")
        if not partition.transforms:
            raise ScenarioError(
                "partition.transforms is empty; a feature partition needs at least one of: "
                + ", ".join(DOMAINS.names())
            )
        for name in partition.transforms:
            DOMAINS.get(name, key="partition.transforms")
    if data.name == "synthetic":
        if data.generator == 2:
            synthetic_cohort.check_generator(label_kind)
        if partition.kind == "natural":
            raise ScenarioError(
                "partition.kind = 'natural' makes one client per writer, but data.name = "
                "'synthetic' generates clients and has no writers; use data.name = 'femnist' "
                "or another partition.kind"
            )
        CLIENT_LABELS.get(partition.kind, key="partition.kind")
        CLIENT_LABELS.get(label_kind, key="partition.label_kind")
        if label_kind == "shards" and partition.shards_per_client > data.num_classes:
            raise ScenarioError(
                f"partition.shards_per_client = {partition.shards_per_client} exceeds "
                f"data.num_classes = {data.num_classes}; lower it or add classes"
            )


def build_federated_data(scenario: Scenario) -> FederatedData:
    """The scenario's FederatedData, cached per process on ``(seed, data, partition)`` and,
    when the ``exposure`` audit plants canaries into clients' text, its settings."""
    return _build(scenario.seed, scenario.data, scenario.partition, scenario.privacy.planted)


@functools.lru_cache(maxsize=4)
def _build(seed: int, data: DataConfig, partition: PartitionConfig,
           exposure: ExposureConfig | None = None) -> FederatedData:
    check_data_config(data, partition)
    dataset = load_dataset(data, seed)
    federation = FEDERATIONS.get(type(dataset))
    if federation is not None:
        return federation(dataset, data, partition, seed, exposure=exposure)
    if exposure is not None:
        raise ScenarioError(
            f"privacy.exposure plants secrets into clients' text, but data.name = "
            f"{data.name!r} holds images; use data.name = 'shakespeare' or drop 'exposure' "
            "from privacy.audits")
    if isinstance(dataset, SyntheticDataset):
        source: _ClientSource = _SyntheticClients(dataset, data, partition, seed)
        cache = synthetic_cache_clients(data, dataset.input_shape)
    else:
        source = _ArrayClients.partitioned(dataset, partition, seed, data.validation_fraction)
        cache = ARRAY_CACHE_CLIENTS
    return FederatedData(source, partition, seed, cache_clients=cache,
                         holdout_rule=holdout_rule(dataset))


def holdout_rule(dataset: object) -> str:
    """How a dataset's federation picks its holdout clients (see ``data/population.py``):
    generated populations by a keyed rule per client, of any size; dataset-backed ones by
    the original seeded permutation, so their runs stay exactly as they were."""
    return "keyed" if isinstance(dataset, SyntheticDataset) else "permutation"


class _ClientSource(Protocol):
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]

    def labels(self, cid: int) -> np.ndarray: ...  # all of a client's labels, in local order

    def samples(self, cid: int) -> np.ndarray: ...  # the matching images, untransformed

    def test_set(self) -> tuple[np.ndarray, np.ndarray]: ...

    def validation_set(self) -> tuple[np.ndarray, np.ndarray] | None: ...


class _ArrayClients:
    """Clients as index sets into a loaded dataset's training split; ``validation``: the
    indices of its validation split (None without one), which no client's set contains."""

    def __init__(self, dataset: ArrayDataset, parts: list[np.ndarray],
                 validation: np.ndarray | None = None) -> None:
        self.dataset = dataset
        self.parts = parts
        self.validation = validation
        self.name = dataset.name
        self.num_classes = dataset.num_classes
        self.input_shape = dataset.input_shape

    @classmethod
    def partitioned(cls, dataset: ArrayDataset, partition: PartitionConfig, seed: int,
                    validation_fraction: float = 0.0) -> _ArrayClients:
        """The partition of ``dataset``'s training split — less its validation split when
        ``validation_fraction > 0`` (carved first, :mod:`fedsim.data.validation`)."""
        rng = numpy_rng(seed, "partition")
        what = f"the {dataset.name} training split"
        if validation_fraction == 0:  # the whole pool, exactly as without the option
            return cls(dataset, split_clients(dataset.train_y, partition, rng, what=what,
                                              writers=dataset.train_writers))
        val, pool = carve(dataset, validation_fraction)
        writers = None if dataset.train_writers is None else dataset.train_writers[pool]
        parts = split_clients(dataset.train_y[pool], partition, rng, writers=writers,
                              what=f"{what} less its validation split ({len(val)} samples)")
        return cls(dataset, [pool[p] for p in parts], validation=val)

    def labels(self, cid: int) -> np.ndarray:
        return self.dataset.train_y[self.parts[cid]]

    def samples(self, cid: int) -> np.ndarray:
        return self.dataset.train_x[self.parts[cid]]

    def test_set(self) -> tuple[np.ndarray, np.ndarray]:
        return self.dataset.test_x, self.dataset.test_y

    def validation_set(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.validation is None:
            return None
        return self.dataset.train_x[self.validation], self.dataset.train_y[self.validation]


def synthetic_cache_clients(data: DataConfig, input_shape: tuple[int, ...]) -> int:
    """How many generated clients fit in ``SYNTHETIC_CACHE_BYTES`` (float32 images)."""
    per_client = 4 * max(1, data.samples_per_client) * math.prod(input_shape)
    return max(16, SYNTHETIC_CACHE_BYTES // per_client)


class _SyntheticClients:
    """Clients generated on demand from ``(seed, client id)`` alone: one client at a time
    with a numpy generator per client and purpose (``data.generator = 1``), or a cohort at a
    time from a counter-based generator (``2``, :mod:`fedsim.data.synthetic_cohort`)."""

    def __init__(self, dataset: SyntheticDataset, data: DataConfig,
                 partition: PartitionConfig, seed: int) -> None:
        self.dataset = dataset
        self.data = data
        self.partition = partition
        self.seed = seed
        self.sampler = CLIENT_LABELS.get(partition.kind, key="partition.kind")
        self.name = dataset.name
        self.num_classes = dataset.num_classes
        self.input_shape = dataset.input_shape
        # labels are asked for by sizes, class counts and samples alike; they are small
        self._labels = _LRU(LABEL_CACHE_CLIENTS)
        self.cohort_generator = data.generator == 2
        self.label_kind = (partition.label_kind if partition.kind == "feature"
                           else partition.kind)

    def labels(self, cid: int) -> np.ndarray:
        return self._labels.get(cid, lambda: self._draw_labels(cid))

    def _draw_labels(self, cid: int) -> np.ndarray:
        if self.cohort_generator:
            return self.cohort_labels([cid])[0]
        rng = numpy_rng(self.seed, "synthetic", "labels", cid)
        y = self.sampler(self.partition, self.num_classes, self.data.samples_per_client, rng)
        y.flags.writeable = False  # shared by every caller through the cache
        return y

    def samples(self, cid: int) -> np.ndarray:
        if self.cohort_generator:
            return self.cohort_samples([cid], self.cohort_labels([cid]))[0]
        rng = numpy_rng(self.seed, "synthetic", "client", cid)
        return self.dataset.generate(self.labels(cid), rng)

    # generator 2: whole cohorts
    def keys(self, cids: list[int]) -> np.ndarray:
        return synthetic_cohort.client_keys(self.seed, cids)

    def cohort_labels(self, cids: list[int]) -> np.ndarray:
        """``(len(cids), samples_per_client)`` labels of ``cids``, drawn together."""
        y = synthetic_cohort.labels(self.keys(cids), self.label_kind, self.partition.alpha,
                                    self.num_classes, self.data.samples_per_client)
        y.flags.writeable = False  # rows are shared by every caller through the cache
        return y

    def cohort_samples(self, cids: list[int], y: np.ndarray) -> np.ndarray:
        """The images of ``cids`` with labels ``y`` (``cohort_labels``), drawn together."""
        return synthetic_cohort.images(self.dataset, self.keys(cids), y)

    def test_set(self) -> tuple[np.ndarray, np.ndarray]:
        return self.dataset.test_set()

    def validation_set(self) -> tuple[np.ndarray, np.ndarray] | None:
        size = validation_size(self.data.test_samples, self.data.validation_fraction)
        return self.dataset.validation_set(size) if size else None


class _LRU:
    """A thread-safe bounded cache; values are built outside the lock."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[int, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: int, make: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]  # type: ignore[return-value]
        value = make()
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: int) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: int, value: object) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)


def _tensors(x: np.ndarray, y: np.ndarray) -> Tensors:
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    if not x.flags.writeable:  # torch.from_numpy needs memory it may own
        x = x.copy()
    if not y.flags.writeable:
        y = y.copy()
    return torch.from_numpy(x), torch.from_numpy(y)


class FederatedData:
    """Per-client train/test tensors, a global test set and the holdout clients.

    ``holdout`` and ``participating`` are sorted sequences of client ids read from a
    :class:`~fedsim.data.population.Population` (O(log N) per item, no Python object per
    client); ``holdout_rule`` picks how the holdout clients are chosen (``"permutation"``,
    the original rule, unless the builder says otherwise).

    ``input_kind`` says what a sample is: ``"image"`` (float32 ``(C, H, W)``) here,
    ``"tokens"`` (int64 ``(seq_len,)`` ids) in a text federation
    (:class:`fedsim.data.shakespeare.TextFederation`), where ``num_classes`` is the
    vocabulary size.

    Each client's samples are split into local train/test (``test_fraction``, at least one
    of each) by ``(seed, "split", cid)``. Under a ``feature`` partition the client's domain
    transform is applied to both its train and test data; the global test set stays
    untransformed, so it measures the shared task, not any one domain; so does the
    validation split (:meth:`validation`), when the scenario holds one out. Returned tensors
    are shared between callers: treat them as read-only.
    """

    input_kind = "image"

    def __init__(self, source: _ClientSource, partition: PartitionConfig, seed: int,
                 cache_clients: int = ARRAY_CACHE_CLIENTS,
                 holdout_rule: str = "permutation") -> None:
        self._source = source
        self.partition = partition
        self.seed = seed
        self.name = source.name
        self.num_clients = partition.num_clients
        self.num_classes = source.num_classes
        self.input_shape = source.input_shape
        self.population: Population = make_population(
            holdout_rule, seed, self.num_clients, partition.num_holdout)
        self.holdout: ClientIds = self.population.holdout
        self.participating: ClientIds = self.population.participating
        self._clients = _LRU(cache_clients)
        self._global: Tensors | None = None
        self._validation: Tensors | tuple[()] | None = None  # () = none held out

    # ---------------------------------------------------------------- per client

    def client_train(self, cid: int) -> Tensors:
        """Client ``cid``'s local training data: x float32 NCHW, y int64."""
        return self._client(cid)[0]

    def client_test(self, cid: int) -> Tensors:
        """Client ``cid``'s local test data (same domain as its training data)."""
        return self._client(cid)[1]

    def class_counts(self, cid: int) -> tuple[list[int], list[int]]:
        """Per-class sample counts of the client's (train, test) split, without any images."""
        labels = self._source.labels(self._check(cid))
        train, test = self._split(cid, len(labels))
        return (np.bincount(labels[train], minlength=self.num_classes).tolist(),
                np.bincount(labels[test], minlength=self.num_classes).tolist())

    def client_size(self, cid: int) -> int:
        """Number of local *training* samples (the FedAvg weight of the client's update)."""
        n = len(self._source.labels(self._check(cid)))
        return n - self._num_test(n)

    def work_estimate(self) -> Callable[[int], int] | None:
        """:meth:`client_size` where it is a lookup (dataset-backed clients: their partition),
        to plan cohorts of equal work with; None where it would draw a generated client's
        labels (synthetic clients), too costly to ask for every sampled client."""
        return self.client_size if isinstance(self._source, _ArrayClients) else None

    def describe(self, cid: int) -> dict:
        """What the data knows about client ``cid`` beyond its samples (a text client's
        speaking role); nothing for image clients."""
        self._check(cid)
        return {}

    def example_inputs(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` inputs of the federation's kind and shape, for checks that run a model before
        training: zeros, or standard normal draws from ``generator``."""
        shape = (n, *self.input_shape)
        if generator is None:
            return torch.zeros(shape)
        return torch.randn(shape, generator=generator)

    def domain(self, cid: int) -> tuple[str, float] | None:
        """The client's (transform, strength) under a feature partition, else None."""
        if self.partition.kind != "feature":
            return None
        return client_domain(self.partition, self.seed, self._check(cid))

    # ---------------------------------------------------------------- global

    def global_test(self) -> Tensors:
        """The dataset's own test split (untransformed), the same for every client."""
        if self._global is None:
            self._global = _tensors(*self._source.test_set())
        return self._global

    @property
    def has_validation(self) -> bool:
        """Whether a validation split is held out (``data.validation_fraction > 0``)."""
        return self.validation() is not None

    def validation(self) -> Tensors | None:
        """The validation split (:mod:`fedsim.data.validation`), untransformed, or None when
        the scenario holds none out; no client trains or tests on it."""
        if self._validation is None:
            split = self._source.validation_set()
            self._validation = () if split is None else _tensors(*split)
        return self._validation or None

    # ---------------------------------------------------------------- internals

    def _check(self, cid: int) -> int:
        if not 0 <= cid < self.num_clients:
            raise IndexError(f"client id {cid} is out of range 0..{self.num_clients - 1}")
        return int(cid)

    def _num_test(self, n: int) -> int:
        return min(max(1, math.floor(self.partition.test_fraction * n + 0.5)), n - 1)

    def prefetch(self, cids: list[int]) -> None:
        """Build the clients of ``cids`` not yet cached, together where the data allows
        it (``data.generator = 2``: a cohort's generation in a few array operations); a
        client's data is the same with or without it."""
        if not self._cohort_generated:
            return
        missing = sorted({c for c in map(self._check, cids) if c not in self._clients})
        for cid, data in zip(missing, self._materialize_cohort(missing)):
            self._clients.put(cid, data)

    @property
    def _cohort_generated(self) -> bool:
        return getattr(self._source, "cohort_generator", False)

    def _split(self, cid: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cohort_generated:
            train, test = synthetic_cohort.splits(self._source.keys([cid]), n, self._num_test(n))
            return train[0], test[0]
        order = numpy_rng(self.seed, "split", cid).permutation(n)
        n_test = self._num_test(n)
        return np.sort(order[n_test:]), np.sort(order[:n_test])

    def _client(self, cid: int) -> tuple[Tensors, Tensors]:
        cid = self._check(cid)
        return self._clients.get(cid, lambda: self._materialize(cid))

    def _materialize(self, cid: int) -> tuple[Tensors, Tensors]:
        if self._cohort_generated:
            return self._materialize_cohort([cid])[0]
        x = self._source.samples(cid)
        y = self._source.labels(cid)
        if self.partition.kind == "feature":
            x = apply_domain(x, self.partition, self.seed, cid)
        train, test = self._split(cid, len(y))
        return _tensors(x[train], y[train]), _tensors(x[test], y[test])

    def _materialize_cohort(self, cids: list[int]) -> list[tuple[Tensors, Tensors]]:
        """Generator 2's clients ``cids``: labels, images and local splits drawn for all of
        them at once (:mod:`fedsim.data.synthetic_cohort`), then each one's domain."""
        if not cids:
            return []
        src = self._source
        y = src.cohort_labels(cids)
        for cid, row in zip(cids, y):
            src._labels.put(cid, row)
        x = src.cohort_samples(cids, y)
        n = y.shape[1]
        train, test = synthetic_cohort.splits(src.keys(cids), n, self._num_test(n))
        out = []
        for i, cid in enumerate(cids):
            xi = x[i]
            if self.partition.kind == "feature":
                xi = apply_domain(xi, self.partition, self.seed, cid)
            out.append((_tensors(xi[train[i]], y[i, train[i]]),
                        _tensors(xi[test[i]], y[i, test[i]])))
        return out
