"""Partitions: how a training split is divided among clients (label and quantity skew).

``PARTITIONS`` maps a name to ``fn(labels, cfg, rng) -> list[indices]``: one index array per
client, disjoint, together covering the split. Generated (synthetic) data has no split to
divide, so ``CLIENT_LABELS`` maps the same names to ``fn(cfg, num_classes, n, rng) -> labels``
that draws one client's labels directly; each kind's two forms sit side by side below.
``natural`` is the exception: it follows the writers a dataset records (LEAF), so it has no
label-only form and refuses data without writers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from fedsim.config import PartitionConfig
from fedsim.errors import ScenarioError
from fedsim.registry import Registry
from fedsim.rng import numpy_rng

PartitionFn = Callable[[np.ndarray, PartitionConfig, np.random.Generator], list[np.ndarray]]
LabelSampler = Callable[[PartitionConfig, int, int, np.random.Generator], np.ndarray]

PARTITIONS: Registry[PartitionFn] = Registry("partition")
CLIENT_LABELS: Registry[LabelSampler] = Registry("synthetic partition")

#: A client needs one sample to train on and one for its local test split.
MIN_CLIENT_SAMPLES = 2
DIRICHLET_TRIES = 200


def split_clients(labels: np.ndarray, cfg: PartitionConfig, rng: np.random.Generator,
                  what: str = "the training split",
                  writers: np.ndarray | None = None) -> list[np.ndarray]:
    """Run partition ``cfg.kind`` on ``labels`` and check every client can train and test.

    ``writers`` (each sample's writer index, when the dataset records one) is what the
    ``natural`` partition divides by; the other kinds ignore it. Raises ScenarioError,
    before any training, when there are too few samples for ``partition.num_clients`` or
    when some client ends with fewer than 2 samples.
    """
    n, k = len(labels), cfg.num_clients
    if n < MIN_CLIENT_SAMPLES * k:
        raise ScenarioError(
            f"partition.num_clients = {k} but {what} has only {n} samples; every client needs "
            f"at least {MIN_CLIENT_SAMPLES} (one to train, one to test): set "
            f"partition.num_clients <= {n // MIN_CLIENT_SAMPLES} or use a larger dataset"
        )
    fn = PARTITIONS.get(cfg.kind, key="partition.kind")
    parts = natural(labels, cfg, rng, writers=writers, what=what) if fn is natural else \
        fn(labels, cfg, rng)
    sizes = np.array([len(p) for p in parts])
    if len(parts) != k or sizes.sum() > n or len(np.unique(np.concatenate(parts))) != sizes.sum():
        raise RuntimeError(f"partition {cfg.kind!r} did not return {k} disjoint index sets")
    if sizes.min() < MIN_CLIENT_SAMPLES:
        small = int(np.argmin(sizes))
        raise ScenarioError(
            f"partition.kind = {cfg.kind!r} leaves client {small} with {sizes[small]} sample(s) "
            f"of the {n} in {what}; every client needs at least {MIN_CLIENT_SAMPLES}: lower "
            f"partition.num_clients (now {k}) or change the partition settings"
        )
    return [p.astype(np.int64) for p in parts]


def _floor(cfg: PartitionConfig) -> int:
    return max(cfg.min_size, MIN_CLIENT_SAMPLES)


def _need_floor(n: int, cfg: PartitionConfig) -> int:
    floor = _floor(cfg)
    if n < floor * cfg.num_clients:
        raise ScenarioError(
            f"partition.kind = {cfg.kind!r} needs partition.num_clients x partition.min_size = "
            f"{cfg.num_clients} x {floor} samples but only {n} exist: lower "
            "partition.num_clients or partition.min_size"
        )
    return floor


# --------------------------------------------------------------------------- iid


@PARTITIONS.register("iid")
def iid(labels: np.ndarray, cfg: PartitionConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and split into ``num_clients`` near-equal parts."""
    parts = np.array_split(rng.permutation(len(labels)), cfg.num_clients)
    return [np.sort(p) for p in parts]


@CLIENT_LABELS.register("iid")
def iid_labels(cfg: PartitionConfig, num_classes: int, n: int,
               rng: np.random.Generator) -> np.ndarray:
    """``n`` labels drawn uniformly from all classes."""
    return rng.integers(0, num_classes, size=n).astype(np.int64)


# --------------------------------------------------------------------------- dirichlet


@PARTITIONS.register("dirichlet")
def dirichlet(labels: np.ndarray, cfg: PartitionConfig,
              rng: np.random.Generator) -> list[np.ndarray]:
    """Label skew: each class is spread over clients with Dirichlet(alpha) proportions.

    The standard scheme of Yurochkin et al. 2019 / Hsu et al. 2019 as implemented in
    NIID-Bench (Li et al. 2022): clients already holding ``n / num_clients`` samples get no
    more of the next class, and the whole draw is repeated (at most 200 times) until every
    client has ``max(min_size, 2)`` samples.
    """
    n, k = len(labels), cfg.num_clients
    floor = _need_floor(n, cfg)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    cap = n / k
    for _ in range(DIRICHLET_TRIES):
        counts = np.zeros((len(by_class), k), dtype=np.int64)
        sizes = np.zeros(k, dtype=np.int64)
        for c, idx in enumerate(by_class):
            open_ = sizes < cap
            p = np.where(open_, rng.dirichlet(np.full(k, cfg.alpha)), 0.0)
            total = p.sum()
            if not np.isfinite(total) or total <= 0:  # underflow at tiny alpha
                p, total = open_.astype(float), open_.sum()
            cuts = (np.cumsum(p / total) * len(idx)).astype(np.int64)[:-1]
            counts[c] = np.diff(np.concatenate([[0], cuts, [len(idx)]]))
            sizes += counts[c]
        if sizes.min() >= floor:
            break
    else:
        raise ScenarioError(
            f"partition.kind = 'dirichlet' with partition.alpha = {cfg.alpha} left some of the "
            f"partition.num_clients = {k} clients below {floor} samples (partition.min_size = "
            f"{cfg.min_size}, at least {MIN_CLIENT_SAMPLES}) in {DIRICHLET_TRIES} draws from {n} "
            f"samples ({n / k:.1f} per client on average): raise partition.alpha, or lower "
            "partition.min_size or partition.num_clients"
        )
    owner = np.empty(n, dtype=np.int64)
    for c, idx in enumerate(by_class):
        owner[rng.permutation(idx)] = np.repeat(np.arange(k), counts[c])
    order = np.argsort(owner, kind="stable")
    return np.split(order, np.cumsum(sizes)[:-1])


@CLIENT_LABELS.register("dirichlet")
def dirichlet_labels(cfg: PartitionConfig, num_classes: int, n: int,
                     rng: np.random.Generator) -> np.ndarray:
    """``n`` labels from the client's own class proportions ~ Dirichlet(alpha) (Hsu et al. 2019).

    The client's size is fixed at ``n``, so ``min_size`` has nothing to do here.
    """
    p = rng.dirichlet(np.full(num_classes, cfg.alpha))
    if not np.all(np.isfinite(p)) or p.sum() <= 0:  # underflow at tiny alpha: one class
        p = np.eye(num_classes)[rng.integers(num_classes)]
    return rng.choice(num_classes, size=n, p=p / p.sum()).astype(np.int64)


# --------------------------------------------------------------------------- shards


@PARTITIONS.register("shards")
def shards(labels: np.ndarray, cfg: PartitionConfig,
           rng: np.random.Generator) -> list[np.ndarray]:
    """Pathological non-IID (McMahan et al. 2017): sorted by label, cut into shards, dealt out.

    The ``num_clients * shards_per_client`` shards are dealt at random, then swapped between
    clients wherever two of a client's shards share a label, so each client sees
    ``shards_per_client`` distinct classes whenever the label counts allow it (a shard that
    straddles a class boundary adds one more class).
    """
    k, per = cfg.num_clients, cfg.shards_per_client
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]  # by label, random within class
    pieces = np.array_split(order, k * per)
    shard_label = [int(np.bincount(labels[p]).argmax()) if len(p) else -1 for p in pieces]
    deal = rng.permutation(k * per).reshape(k, per).tolist()
    _separate_labels(deal, shard_label, rng)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in deal]


def _separate_labels(deal: list[list[int]], shard_label: list[int],
                     rng: np.random.Generator, tries: int = 200) -> None:
    """Swap shards between clients (in place) so no client holds two of the same label."""
    k = len(deal)
    for i in range(k):
        for a in range(len(deal[i])):
            mine = [shard_label[s] for s in deal[i]]
            if mine.count(mine[a]) == 1:
                continue
            rest_i = mine[:a] + mine[a + 1:]
            for _ in range(tries):
                j = int(rng.integers(k))
                b = int(rng.integers(len(deal[j])))
                if j == i:
                    continue
                theirs = [shard_label[s] for s in deal[j]]
                rest_j = theirs[:b] + theirs[b + 1:]
                if theirs[b] not in rest_i and mine[a] not in rest_j:
                    deal[i][a], deal[j][b] = deal[j][b], deal[i][a]
                    break


@CLIENT_LABELS.register("shards")
def shards_labels(cfg: PartitionConfig, num_classes: int, n: int,
                  rng: np.random.Generator) -> np.ndarray:
    """``n`` labels spread evenly over ``shards_per_client`` distinct random classes."""
    if cfg.shards_per_client > num_classes:
        raise ScenarioError(
            f"partition.shards_per_client = {cfg.shards_per_client} exceeds data.num_classes = "
            f"{num_classes}; lower it or add classes"
        )
    classes = rng.choice(num_classes, size=cfg.shards_per_client, replace=False)
    return rng.permutation(classes[np.arange(n) % len(classes)]).astype(np.int64)


# --------------------------------------------------------------------------- quantity


@PARTITIONS.register("quantity")
def quantity(labels: np.ndarray, cfg: PartitionConfig,
             rng: np.random.Generator) -> list[np.ndarray]:
    """Quantity skew (Li et al. 2022): sizes proportional to LogNormal(0, sigma), labels iid.

    Every client first gets ``max(min_size, 2)`` samples; the rest are shared out in
    proportion to the log-normal weights (largest remainder), so all samples are used.
    """
    n, k = len(labels), cfg.num_clients
    floor = _need_floor(n, cfg)
    weights = rng.lognormal(0.0, cfg.sigma, size=k)
    spare = n - floor * k
    share = weights / weights.sum() * spare
    extra = np.floor(share).astype(np.int64)
    extra[np.argsort(-(share - extra), kind="stable")[: spare - extra.sum()]] += 1
    cuts = np.cumsum(floor + extra)[:-1]
    return [np.sort(p) for p in np.split(rng.permutation(n), cuts)]


@CLIENT_LABELS.register("quantity")
def quantity_labels(cfg: PartitionConfig, num_classes: int, n: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Uniform labels; size ``n * LogNormal(-sigma^2/2, sigma)`` (mean ``n``), >= min_size."""
    size = n * math.exp(cfg.sigma * rng.standard_normal() - cfg.sigma**2 / 2)
    return rng.integers(0, num_classes, size=max(_floor(cfg), round(size))).astype(np.int64)


# --------------------------------------------------------------------------- natural


@PARTITIONS.register("natural")
def natural(labels: np.ndarray, cfg: PartitionConfig, rng: np.random.Generator,
            writers: np.ndarray | None = None,
            what: str = "the training split") -> list[np.ndarray]:
    """One client per real writer (LEAF's FEMNIST, Caldas et al. 2018): no simulated skew.

    ``writers[i]`` is sample i's writer index, in sorted user-id order; client ids follow
    that order. ``max_clients`` = m > 0 keeps m writers: the first m of a permutation drawn
    with a fixed seed, independent of the scenario seed, so every scenario (and seed) uses
    the same writers and a smaller cap's writers are a subset of a larger cap's. The other
    writers' samples are left out. ``partition.num_clients`` must equal the writers used;
    ``rng`` is not needed (the partition is the data's own).
    """
    if writers is None:
        raise ScenarioError(
            f"partition.kind = 'natural' makes one client per writer, but {what} records no "
            "writers; use a dataset that does (data.name = 'femnist') or another "
            "partition.kind (iid, dirichlet, shards, quantity, feature)"
        )
    total = int(writers.max()) + 1 if len(writers) else 0
    chosen = natural_clients(total, cfg, f"{what} has {total} writers")
    order = np.argsort(writers, kind="stable")  # sample indices grouped by writer, in order
    bounds = np.searchsorted(writers[order], np.arange(total + 1))
    parts = [order[bounds[w]:bounds[w + 1]] for w in chosen]
    small = [int(w) for w, p in zip(chosen, parts) if len(p) < MIN_CLIENT_SAMPLES]
    if small:
        raise ScenarioError(
            f"partition.kind = 'natural': writer #{small[0]} (in sorted user-id order) has "
            f"fewer than {MIN_CLIENT_SAMPLES} samples in {what}, and every client needs one to "
            "train and one to test; drop such writers when preparing the files (LEAF's "
            "preprocess.sh -k sets a minimum of samples per writer)"
        )
    return parts


def natural_clients(total: int, cfg: PartitionConfig, has: str, unit: str = "writer"
                    ) -> np.ndarray:
    """Which of ``total`` natural units (writers, speaking roles) become clients, in order.

    ``max_clients`` = m > 0 keeps m of them: the first m of a permutation drawn with a fixed
    seed, independent of the scenario seed, so every scenario (and seed) uses the same units
    and a smaller cap's units are a subset of a larger cap's. ``partition.num_clients`` must
    equal the number kept; ``has`` says where the units come from (``"... has 12 writers"``).
    """
    chosen = np.arange(total)
    if 0 < cfg.max_clients < total:
        chosen = np.sort(numpy_rng(0, "natural", "writers").permutation(total)[:cfg.max_clients])
    if cfg.num_clients != len(chosen):
        cap = f"partition.max_clients = {cfg.max_clients} of them" if cfg.max_clients else \
            "all of them (partition.max_clients = 0)"
        raise ScenarioError(
            f"partition.kind = 'natural' makes one client per {unit}: {has} and uses {cap}, "
            f"so {len(chosen)} clients, but partition.num_clients = {cfg.num_clients}; set "
            f"partition.num_clients = {len(chosen)}"
            + (f", or partition.max_clients = {cfg.num_clients} to use that many {unit}s"
               if cfg.num_clients < total else "")
        )
    return chosen


# --------------------------------------------------------------------------- feature


@PARTITIONS.register("feature")
def feature(labels: np.ndarray, cfg: PartitionConfig,
            rng: np.random.Generator) -> list[np.ndarray]:
    """Feature skew (Li et al. 2022): the ``label_kind`` partition; each client's domain
    transform (``fedsim.data.domains``) is applied when its data is materialized."""
    return PARTITIONS.get(cfg.label_kind, key="partition.label_kind")(labels, cfg, rng)


@CLIENT_LABELS.register("feature")
def feature_labels(cfg: PartitionConfig, num_classes: int, n: int,
                   rng: np.random.Generator) -> np.ndarray:
    """The ``label_kind`` labels; the domain transform is applied to the generated images."""
    sampler = CLIENT_LABELS.get(cfg.label_kind, key="partition.label_kind")
    return sampler(cfg, num_classes, n, rng)
