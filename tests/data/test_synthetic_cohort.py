"""Generator 2 (``data.generator = 2``): synthetic clients generated a cohort at a time."""

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
from scipy import stats

from fedsim.config import DataConfig, PartitionConfig, ScenarioError
from fedsim.data import federated, synthetic_cohort

DATA = DataConfig(name="synthetic", samples_per_client=24, image_size=6, generator=2)


def _fresh(data=DATA, partition=None, seed=3):
    """A FederatedData of its own (an empty client cache), not the per-process one."""
    partition = partition or PartitionConfig(kind="feature", label_kind="dirichlet",
                                             num_clients=500, alpha=0.3)
    return federated._build.__wrapped__(seed, data, partition)


def _clients(fd, cids):
    return {c: (fd.client_train(c), fd.client_test(c)) for c in cids}


@pytest.mark.parametrize("label_kind", ["dirichlet", "iid"])
def test_cohort_generation_equals_one_client_at_a_time_in_any_order(label_kind):
    """The same clients, bit for bit: one at a time, as one cohort, as cohorts in another
    order and chunking, with some already cached."""
    part = PartitionConfig(kind="feature", label_kind=label_kind, num_clients=500, alpha=0.3)
    cids = random.Random(0).sample(range(500), 40)
    alone = _clients(_fresh(partition=part), cids)
    cohort = _fresh(partition=part)
    cohort.prefetch(cids)
    shuffled = _fresh(partition=part)
    order = list(reversed(cids))
    shuffled.client_train(order[5])  # one cached before its cohort
    for start in range(0, len(order), 7):
        shuffled.prefetch(order[start : start + 7] + order[:2])  # overlapping cohorts
    for fd in (cohort, shuffled):
        got = _clients(fd, cids)
        for c in cids:
            for (xa, ya), (xb, yb) in zip(alone[c], got[c]):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_sizes_and_class_counts_match_the_generated_data():
    fd = _fresh()
    fd.prefetch([7, 8, 9])
    other = _fresh()  # asks for counts before any image is generated
    for c in (7, 8, 9):
        (_, ytr), (_, yte) = fd.client_train(c), fd.client_test(c)
        assert other.client_size(c) == len(ytr) == 24 - fd._num_test(24)
        want = (np.bincount(ytr.numpy(), minlength=10).tolist(),
                np.bincount(yte.numpy(), minlength=10).tolist())
        assert other.class_counts(c) == want


def test_another_seed_or_client_gives_other_data():
    a, b = _fresh(seed=3), _fresh(seed=4)
    assert not torch.equal(a.client_train(1)[0], b.client_train(1)[0])
    assert not torch.equal(a.client_train(1)[0][:5], a.client_train(2)[0][:5])


def test_normals_and_uniforms_have_their_distributions():
    """Kolmogorov–Smirnov against N(0, 1) and U(0, 1) (seeded, so the p-values are fixed),
    and the moments within 5 standard errors."""
    keys = synthetic_cohort.client_keys(0, range(200))
    z = synthetic_cohort.normals(keys, 5, 501).ravel().astype(np.float64)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    n = len(z)  # standard errors: of the mean 1/√n, of the standard deviation 1/√(2n)
    assert abs(z.mean()) < 5 / math.sqrt(n) and abs(z.std() - 1) < 5 / math.sqrt(2 * n)
    u = synthetic_cohort.uniforms(keys, 2, 500).ravel()
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert u.min() > 0 and u.max() < 1


def test_dirichlet_labels_have_the_dirichlet_spread():
    """Per client, the label shares of n draws vary across clients as a Dirichlet(alpha)
    proportion plus multinomial noise: Var = v + (1/K − 1/K² − v)/n with
    v = (1/K)(1 − 1/K)/(Kα + 1); the mean share is 1/K."""
    k, n, alpha, m = 10, 50, 0.5, 4000
    keys = synthetic_cohort.client_keys(1, range(m))
    y = synthetic_cohort.labels(keys, "dirichlet", alpha, k, n)
    shares = np.stack([np.bincount(row, minlength=k) for row in y]) / n
    v = (1 / k) * (1 - 1 / k) / (k * alpha + 1)
    want = v + (1 / k - 1 / k**2 - v) / n
    assert shares.var(axis=0).mean() == pytest.approx(want, rel=0.1)
    assert shares.mean() == pytest.approx(1 / k)


def test_label_kinds_it_does_not_draw_are_refused():
    with pytest.raises(ScenarioError, match=r"data\.generator = 2 .* 'shards'"):
        federated.check_data_config(DATA, PartitionConfig(kind="shards"))
    with pytest.raises(ScenarioError, match=r"data\.generator = 7 is out of range"):
        dataclasses.replace(DATA, generator=7)


def test_generator_1_is_unchanged_by_prefetch():
    """``prefetch`` is a no-op under generator 1 (clients stay built one at a time)."""
    data = dataclasses.replace(DATA, generator=1)
    fd = _fresh(data)
    fd.prefetch([1, 2])
    assert len(fd._clients) == 0
    assert fd.client_train(1)[0].shape == (24 - fd._num_test(24), 1, 6, 6)
