"""Partitions (label and quantity skew), synthetic label samplers and domain transforms."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.config import PartitionConfig
from fedsim.data.domains import DOMAINS, apply_domain, blur, client_domain, contrast, invert, rotate
from fedsim.data.domains import noise as add_noise
from fedsim.data.partition import CLIENT_LABELS, split_clients
from fedsim.errors import ScenarioError
from fedsim.rng import numpy_rng

LABELS = np.repeat(np.arange(10), 100)  # 1,000 samples, 100 per class


def _split(labels=LABELS, seed=0, **kw) -> list[np.ndarray]:
    return split_clients(labels, PartitionConfig(**kw), numpy_rng(seed, "partition"))


def _entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels, minlength=10) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------- all kinds


@pytest.mark.parametrize("kw", [
    {"kind": "iid"},
    {"kind": "dirichlet", "alpha": 0.1},
    {"kind": "shards", "shards_per_client": 2},
    {"kind": "quantity", "sigma": 2.0},
    {"kind": "feature", "label_kind": "dirichlet"},
])
def test_partitions_are_disjoint_cover_everything_and_are_seeded(kw):
    parts = _split(num_clients=20, **kw)
    assert len(parts) == 20 and all(p.dtype == np.int64 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))
    again = _split(num_clients=20, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = _split(seed=1, num_clients=20, **kw)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_differ_by_at_most_one_and_mix_classes():
    parts = _split(labels=LABELS[:997], num_clients=10, kind="iid")
    assert {len(p) for p in parts} == {99, 100}
    assert min(len(np.unique(LABELS[p])) for p in parts) == 10


def test_dirichlet_skew_grows_as_alpha_shrinks():
    entropy = {a: np.mean([_entropy(LABELS[p]) for p in _split(num_clients=10, kind="dirichlet",
                                                              alpha=a)])
               for a in (0.1, 1.0, 100.0)}
    assert entropy[0.1] < entropy[1.0] < entropy[100.0]
    assert entropy[100.0] > 0.95 * np.log(10)  # near-IID at large alpha


def test_dirichlet_honours_min_size():
    parts = _split(num_clients=20, kind="dirichlet", alpha=0.1, min_size=15)
    assert min(len(p) for p in parts) >= 15


@pytest.mark.parametrize(("per", "k", "labels"), [
    (2, 20, np.repeat(np.arange(10), 20)),  # 40 shards of 5: four per class
    (3, 10, np.repeat(np.arange(10), 30)),  # 30 shards of 10: three per class
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shards_give_exactly_k_classes_per_client(per, k, labels, seed):
    parts = _split(labels=labels, seed=seed, num_clients=k, kind="shards", shards_per_client=per)
    assert [len(np.unique(labels[p])) for p in parts] == [per] * k
    assert {len(p) for p in parts} == {len(labels) // k}


def test_quantity_sizes_spread_with_sigma_and_honour_min_size():
    spread = {s: np.std([len(p) for p in _split(num_clients=50, kind="quantity", sigma=s)])
              for s in (0.0, 0.5, 2.0)}
    assert spread[0.0] == 0.0 and spread[0.5] < spread[2.0]
    parts = _split(num_clients=50, kind="quantity", sigma=3.0, min_size=12)
    assert min(len(p) for p in parts) >= 12 and sum(len(p) for p in parts) == 1000


def test_feature_uses_its_label_partition():
    a = _split(num_clients=7, kind="feature", label_kind="shards")
    b = _split(num_clients=7, kind="shards")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- errors


def test_more_clients_than_samples_is_a_scenario_error():
    with pytest.raises(ScenarioError, match=r"partition.num_clients = 6 but the training split "
                       r"has only 10 samples.*partition.num_clients <= 5"):
        _split(labels=LABELS[:10], num_clients=6)


def test_client_left_with_one_sample_is_a_scenario_error():
    with pytest.raises(ScenarioError, match=r"'shards' leaves client \d+ with [01] sample.*"
                       r"partition.num_clients \(now 10\)"):
        _split(labels=LABELS[:20], num_clients=10, kind="shards", shards_per_client=3)


def test_dirichlet_errors_name_alpha_min_size_and_the_fix():
    with pytest.raises(ScenarioError, match=r"partition.num_clients x partition.min_size = "
                       r"100 x 20 samples but only 1000"):
        _split(num_clients=100, kind="dirichlet", min_size=20)
    with pytest.raises(ScenarioError, match=r"partition.alpha = 0.01 .*partition.num_clients = "
                       r"100 .*partition.min_size = 10.*raise partition.alpha"):
        _split(num_clients=100, kind="dirichlet", alpha=0.01, min_size=10)


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ScenarioError, match="partition.kind = 'dirichlet2'.*choose one of: "
                       "dirichlet, feature, iid, natural, quantity, shards"):
        _split(kind="dirichlet2")


# --------------------------------------------------------------------------- synthetic labels


def test_synthetic_label_samplers_follow_their_kind():
    rng = numpy_rng(0, "t")
    assert len(CLIENT_LABELS.get("iid")(PartitionConfig(), 10, 64, rng)) == 64
    shards = CLIENT_LABELS.get("shards")(PartitionConfig(shards_per_client=3), 10, 64, rng)
    assert len(np.unique(shards)) == 3 and sorted(np.bincount(shards)[np.unique(shards)]) == \
        [21, 21, 22]
    skewed = [_entropy(CLIENT_LABELS.get("dirichlet")(PartitionConfig(alpha=a), 10, 500, rng))
              for a in (0.1, 100.0) for _ in range(20)]
    assert np.mean(skewed[:20]) < 0.5 * np.mean(skewed[20:])
    sizes = [len(CLIENT_LABELS.get("quantity")(PartitionConfig(sigma=1.5, min_size=5), 10, 64,
                                                rng)) for _ in range(200)]
    assert min(sizes) >= 5 and max(sizes) > 3 * 64 and 40 < np.mean(sizes) < 90
    with pytest.raises(ScenarioError, match="shards_per_client = 11 exceeds data.num_classes"):
        CLIENT_LABELS.get("shards")(PartitionConfig(shards_per_client=11), 10, 64, rng)


# --------------------------------------------------------------------------- domains


def _images(n=3, c=2, s=6) -> np.ndarray:
    x = numpy_rng(0, "img").standard_normal((n, c, s, s)).astype(np.float32)
    x.flags.writeable = False  # transforms must never write into the (shared) dataset
    return x


@pytest.mark.parametrize("name", ["rotate", "contrast", "noise", "invert", "blur"])
def test_transforms_keep_shape_and_dtype_and_do_not_mutate(name):
    x = _images()
    out = DOMAINS.get(name)(x, 0.7, numpy_rng(0, "d"))
    assert out.shape == x.shape and out.dtype == np.float32 and not np.allclose(out, x)


def test_transform_references():
    x = _images()
    rng = numpy_rng(0, "d")
    # a quarter turn (strength 1) is exactly a clockwise np.rot90
    np.testing.assert_allclose(rotate(x, 1.0, rng), np.rot90(x, -1, axes=(2, 3)), atol=1e-5)
    np.testing.assert_array_equal(invert(x, 0.5, rng), -x)
    np.testing.assert_allclose(contrast(x, 1.0, rng).mean(axis=(1, 2, 3)),
                               x.mean(axis=(1, 2, 3)), atol=1e-6)
    flat = np.full((1, 1, 5, 5), 3.0, dtype=np.float32)
    np.testing.assert_allclose(blur(flat, 1.0, rng), flat, rtol=1e-6)
    a = add_noise(x, 0.5, numpy_rng(0, "n"))
    np.testing.assert_array_equal(a, add_noise(x, 0.5, numpy_rng(0, "n")))
    assert 0.4 < np.std(a - x) < 0.6


def test_rotate_is_the_four_neighbour_bilinear_definition_bit_for_bit():
    """``rotate`` gathers the four neighbours at once; per output pixel it must compute
    exactly the plain definition (sample grid, clipped source position, four gathers, the
    same float32 products and sums in the same order), so the same bytes on any machine."""
    import math

    def reference(x, strength):
        h, w = x.shape[-2:]
        angle = math.radians(90.0 * strength)
        cos, sin = math.cos(angle), math.sin(angle)
        yy, xx = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2,
                             indexing="ij")
        src_y = np.clip(cos * yy - sin * xx + (h - 1) / 2, 0, h - 1)
        src_x = np.clip(sin * yy + cos * xx + (w - 1) / 2, 0, w - 1)
        y0 = np.minimum(np.floor(src_y).astype(np.int64), h - 2)
        x0 = np.minimum(np.floor(src_x).astype(np.int64), w - 2)
        wy = (src_y - y0).astype(np.float32)
        wx = (src_x - x0).astype(np.float32)
        top = x[..., y0, x0] * (1 - wx) + x[..., y0, x0 + 1] * wx
        bottom = x[..., y0 + 1, x0] * (1 - wx) + x[..., y0 + 1, x0 + 1] * wx
        return (top * (1 - wy) + bottom * wy).astype(np.float32)

    rng = numpy_rng(0, "rotate-test")
    for h, w in [(2, 2), (6, 6), (8, 8), (5, 9), (32, 32)]:
        x = rng.standard_normal((4, 3, h, w), dtype=np.float32)
        for strength in [0.0, 0.25, 1 / 3, 0.5, float(rng.uniform()), 1.0]:
            for images in (x, x[:, :, ::-1], x[0]):  # contiguous, strided, one image
                got, want = rotate(images, strength, rng), reference(images, strength)
                assert got.dtype == np.float32 and got.shape == want.shape
                assert got.tobytes() == want.tobytes()


def test_client_domains_cycle_through_transforms_deterministically():
    cfg = PartitionConfig(kind="feature", transforms=("rotate", "blur"))
    domains = [client_domain(cfg, 0, cid) for cid in range(4)]
    assert [d[0] for d in domains] == ["rotate", "blur", "rotate", "blur"]
    assert all(0.25 <= d[1] <= 1.0 for d in domains) and domains[0][1] != domains[2][1]
    assert domains == [client_domain(cfg, 0, cid) for cid in range(4)]
    x = _images()
    np.testing.assert_array_equal(apply_domain(x, cfg, 0, 2), apply_domain(x, cfg, 0, 2))
    assert not np.allclose(apply_domain(x, cfg, 0, 0), apply_domain(x, cfg, 0, 2))
