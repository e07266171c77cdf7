"""The validation split: data no client trains or tests on, for choosing hyperparameters.

Tuning on the global test set would report a selected maximum as if it were a fresh
measurement; the validation split keeps selection and reporting apart. It is carved from a
dataset's *training* pool before partitioning — a stratified (per-class) fraction
``data.validation_fraction``, drawn with a fixed seed independent of the scenario seed (like
digits' test split), so every scenario seed and every sweep cell holds out the same images
and partitions the rest. It is disjoint from the global test set (a separate split of the
files), from every client's local train and test split (the partition never sees it) and from
holdout clients. Generated (synthetic) data has no pool to carve: its validation set is
drawn fresh from its own stream, like its test set (:meth:`SyntheticDataset.validation_set`).
"""

from __future__ import annotations

import numpy as np

from fedsim.data.datasets import ArrayDataset, stratified_indices
from fedsim.rng import numpy_rng

#: the validation images do not depend on the scenario seed
VALIDATION_SEED = 0


def validation_size(pool: int, fraction: float) -> int:
    """Samples a fraction of ``pool`` holds out: ``round(fraction * pool)``, at least one
    when ``fraction > 0``."""
    return max(1, round(fraction * pool)) if fraction > 0 else 0


def carve(dataset: ArrayDataset, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(validation indices, remaining training indices) into ``dataset``'s training split,
    both sorted: per-class quotas by largest remainder, random within each class."""
    labels = dataset.train_y
    n_val = validation_size(len(labels), fraction)
    rng = numpy_rng(VALIDATION_SEED, dataset.name, "validation")
    val = stratified_indices(labels, n_val, rng)
    keep = np.ones(len(labels), dtype=bool)
    keep[val] = False
    return val, np.flatnonzero(keep)
