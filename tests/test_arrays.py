"""Model state through Flower's records and aggregation: integer buffers stay integers."""

import numpy as np
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from torch import nn

from fedsim.arrays import load_record, model_to_record, record_to_state


def bn_model():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def test_round_trip_is_exact():
    torch.manual_seed(0)
    a, b = bn_model(), bn_model()
    a.train()
    a(torch.randn(4, 1, 6, 6))
    load_record(b, model_to_record(a))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and va.dtype == vb.dtype and torch.equal(va, vb)


def test_num_batches_tracked_survives_flower_averaging_as_integer():
    torch.manual_seed(0)
    models = [bn_model() for _ in range(3)]
    for steps, m in zip((3, 4, 6), models):
        m.train()
        for _ in range(steps):
            m(torch.randn(4, 1, 6, 6))
    replies = [
        RecordDict({"arrays": model_to_record(m), "metrics": MetricRecord({"num-examples": n}),
                    "c": ConfigRecord({"x": 1})})
        for m, n in zip(models, (10, 10, 20))
    ]
    agg = aggregate_arrayrecords(replies, "num-examples")
    assert agg["1.num_batches_tracked"].numpy().dtype.kind == "f"  # Flower's behaviour
    target = bn_model()
    load_record(target, agg)
    nbt = target.state_dict()["1.num_batches_tracked"]
    assert nbt.dtype == torch.int64 and nbt.item() == round(0.25 * 3 + 0.25 * 4 + 0.5 * 6)
    expected = sum(w * m.state_dict()["1.running_mean"] for w, m in zip((.25, .25, .5), models))
    assert torch.allclose(target.state_dict()["1.running_mean"], expected, atol=1e-6)


def test_partial_record_leaves_other_entries_untouched():
    torch.manual_seed(0)
    b = bn_model()
    before = b.state_dict()["0.weight"].clone()
    load_record(b, {"1.weight": torch.full((4,), 2.0)})
    assert torch.equal(b.state_dict()["0.weight"], before)
    assert torch.equal(b.state_dict()["1.weight"], torch.full((4,), 2.0))


def test_unknown_array_name_is_an_error():
    import pytest

    with pytest.raises(KeyError, match="does not belong"):
        load_record(bn_model(), {"nope": torch.zeros(1)})


def test_record_to_state_copies():
    rec = model_to_record(bn_model())
    state = record_to_state(rec)
    assert set(state) == set(rec.keys())
    assert isinstance(state["0.weight"], torch.Tensor)
    assert np.allclose(state["0.weight"].numpy(), rec["0.weight"].numpy())


# -- the fast codec (fedsim.arrays.to_array / from_array / fast_flower_records) -------------

import pytest  # noqa: E402
from flwr.app import Array  # noqa: E402

from fedsim.arrays import fast_flower_records, from_array, to_array  # noqa: E402

LAYOUTS = [np.array(7, dtype=np.int64), np.arange(6, dtype=np.float32).reshape(2, 3),
           np.random.default_rng(0).standard_normal((4, 3, 2, 2)), np.array([True, False]),
           np.arange(5, dtype=np.uint8), np.zeros((0, 3), np.float32),
           np.arange(12, dtype=np.float16).reshape(3, 4)]


@pytest.mark.parametrize("a", LAYOUTS, ids=lambda a: f"{a.dtype}{a.shape}")
def test_to_array_is_flowers_array_byte_for_byte(a):
    ours, flowers = to_array(a), Array(a)
    assert vars(ours) == vars(flowers)  # same fields, same bytes, same dirty flag
    assert ours.object_id == flowers.object_id
    out = from_array(flowers)
    ref = flowers.numpy()
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.tobytes() == ref.tobytes()
    assert out.flags.writeable and out.flags.c_contiguous


def test_non_standard_layouts_go_to_flowers_parser():
    fortran = Array(np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)))
    assert np.array_equal(from_array(fortran), np.arange(6).reshape(2, 3))
    big_endian = Array(np.arange(3, dtype=">i4"))
    assert np.array_equal(from_array(big_endian), [0, 1, 2])


def test_fast_numpy_patch_is_exact_and_restored():
    original = Array.numpy
    arrays = [Array(a) for a in LAYOUTS]
    with fast_flower_records(), fast_flower_records():
        assert Array.numpy is not original
        fast = [a.numpy() for a in arrays]
    assert Array.numpy is original
    for f, a in zip(fast, arrays):
        ref = a.numpy()
        assert f.dtype == ref.dtype and f.tobytes() == ref.tobytes()


# -- Flower's records without their per-item overheads ------------------------------------

from flwr.app import ArrayRecord  # noqa: E402

from fedsim.arrays import TypedDict, array_record, peek_array  # noqa: E402


def test_array_record_equals_setting_items_one_by_one():
    arrays = {f"k{i}": to_array(a) for i, a in enumerate(LAYOUTS)}
    slow = ArrayRecord()
    for k, v in arrays.items():
        slow[k] = v
    fast = array_record(arrays)
    assert vars(fast) == vars(slow)  # same checks, items (the same Array objects), dirty flag
    assert fast.object_id == slow.object_id
    with pytest.raises(TypeError, match="str to Array"):
        array_record({"w": np.zeros(2)})
    with pytest.raises(TypeError, match="str to Array"):
        array_record({1: to_array(np.zeros(2))})


def test_fast_setitem_runs_flowers_checks_and_is_restored():
    original = TypedDict.__setitem__
    with fast_flower_records(), fast_flower_records():
        assert TypedDict.__setitem__ is not original
        rec = ArrayRecord()
        rec["w"] = to_array(np.ones(3))
        assert rec.is_dirty and list(rec.keys()) == ["w"]
        with pytest.raises(TypeError, match="Value must be of type"):
            rec["x"] = np.ones(3)
        with pytest.raises(TypeError, match="Key must be of type"):
            rec[3] = to_array(np.ones(3))
        metrics = MetricRecord()
        with pytest.raises(TypeError):
            metrics["m"] = "not a number"
        content = RecordDict({"arrays": rec, "metrics": MetricRecord({"n": 2})})
        view = content.metric_records  # Flower's synced views still write through
        view["more"] = MetricRecord({"a": 1.0})
        assert isinstance(content["more"], MetricRecord)
    assert TypedDict.__setitem__ is original


def test_peek_array_is_a_read_only_view_with_the_same_values():
    for a in LAYOUTS:
        arr = to_array(a)
        view = peek_array(arr)
        assert view.dtype == a.dtype and view.shape == a.shape and np.array_equal(view, a)
        assert not view.flags.writeable  # reads the message's bytes, cannot change them
    fortran = Array(np.asfortranarray(np.arange(6.0).reshape(2, 3)))
    assert np.array_equal(peek_array(fortran), np.arange(6.0).reshape(2, 3))


def test_state_to_record_encodes_each_value_as_to_array_would():
    """Tensors (with or without gradient, views, integer 0-d) and numpy arrays, all or only
    ``keys``: the same Arrays as ``to_array`` of ``value.detach().cpu().numpy()``."""
    import torch

    from fedsim.arrays import state_to_record

    grad = torch.ones(3, requires_grad=True)
    state = {"w": torch.arange(12.0).reshape(3, 4).t(), "g": grad * 2, "n": torch.tensor(7),
             "a": np.arange(6, dtype=np.float16).reshape(2, 3)[:, ::2], "p": grad}
    want = {k: to_array(v if isinstance(v, np.ndarray) else v.detach().cpu().numpy())
            for k, v in state.items()}
    got = state_to_record(state)
    assert list(got) == list(want) and all(vars(got[k]) == vars(want[k]) for k in want)
    assert vars(got) == vars(array_record(want))
    part = state_to_record(state, ["n", "w"])
    assert list(part) == ["n", "w"] and vars(part["w"]) == vars(want["w"])
    with pytest.raises(TypeError, match="str to Array"):
        state_to_record({1: np.zeros(2)})
    with pytest.raises(TypeError, match="object arrays"):
        state_to_record({"o": np.array([None])})


# -- FedAvg's weighted average on flat buffers (fedsim.arrays.aggregate_arrayrecords) ------

from flwr.serverapp.strategy import fedavg  # noqa: E402

from fedsim.arrays import aggregate_arrayrecords as fast_aggregate  # noqa: E402
from fedsim.arrays import all_finite, weighted_average  # noqa: E402

#: (dtype, shape) of every array in the random replies: float32/float64 tensors, 0-d
#: float32 and int64 (num_batches_tracked), other integers and bools, an empty array
AGG_LAYOUTS = [(np.float32, (3, 4)), (np.float32, (5,)), (np.float32, ()), (np.int64, ()),
               (np.float64, (2, 2)), (np.int64, (3,)), (np.int32, (2,)), (np.uint8, (4,)),
               (np.bool_, (3,)), (np.float32, (0, 2)), (np.float64, (1, 1, 3))]


def _random_replies(seed: int, n: int, weights=None, layouts=AGG_LAYOUTS, metric="num-examples"):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arrays = {}
        for j, (dtype, shape) in enumerate(layouts):
            if np.dtype(dtype).kind == "f":  # wide range: sums round differently per order
                e = 3 if np.dtype(dtype).itemsize == 2 else 8
                a = (rng.standard_normal(shape) * 10.0 ** rng.integers(-e, e, shape)).astype(dtype)
            elif dtype is np.bool_:
                a = rng.integers(0, 2, shape).astype(bool)
            else:
                a = rng.integers(0, 200, shape).astype(dtype)
            arrays[f"a{j}"] = Array(np.asarray(a))
        w = int(rng.integers(1, 60)) if weights is None else weights[i]
        out.append(RecordDict({"arrays": ArrayRecord(arrays),
                               "metrics": MetricRecord({"loss": 0.5, metric: w}),
                               "client": ConfigRecord({"client-id": i})}))
    return out


def _assert_same_record(ours, flowers):
    assert list(ours.keys()) == list(flowers.keys())
    for k in flowers:
        a, b = ours[k], flowers[k]
        assert (a.dtype, tuple(a.shape), a.stype, a.data) == \
            (b.dtype, tuple(b.shape), b.stype, b.data), k


@pytest.mark.parametrize("seed,n,weights", [(0, 1, None), (1, 7, None), (2, 40, None),
                                            (3, 5, [0.1, 0.7, 2.5, 1e-3, 3.0]),
                                            (4, 3, [1, 1, 1])])
def test_weighted_average_is_flowers_aggregate_bitwise(seed, n, weights):
    replies = _random_replies(seed, n, weights)
    flowers = fedavg.aggregate_arrayrecords(replies, "num-examples")
    ours = weighted_average(replies, "num-examples")
    assert ours is not None  # these replies take the flat path
    _assert_same_record(ours, flowers)
    assert ours["a0"].numpy().dtype == np.float32  # float32 stays float32 (NumPy 2)
    assert ours["a3"].numpy().dtype == np.float64 and ours["a3"].shape == ()


def test_weighted_average_leaves_other_replies_to_flower():
    """Replies the flat path cannot take give None, and aggregate_arrayrecords then runs
    Flower's own function: the same result either way."""
    base = _random_replies(5, 4)
    half = _random_replies(6, 3, layouts=[(np.float16, (3,)), (np.float32, (2,))])
    fortran = _random_replies(7, 2, layouts=[(np.float32, (2, 3))])
    fortran[1]["arrays"]["a0"] = Array(np.asfortranarray(np.ones((2, 3), np.float32)))
    reshaped = _random_replies(8, 2, layouts=[(np.float32, (2, 3))])
    reshaped[1]["arrays"]["a0"] = Array(np.ones((1, 3), np.float32))  # Flower broadcasts
    reordered = _random_replies(9, 2, layouts=[(np.float32, (2,)), (np.float64, (2,))])
    reordered[1]["arrays"] = ArrayRecord({"a1": reordered[1]["arrays"]["a1"],
                                          "a0": reordered[1]["arrays"]["a0"]})
    two_records = _random_replies(10, 2, layouts=[(np.float32, (2,))])
    two_records[0]["more"] = ArrayRecord({"b": Array(np.ones(2, np.float32))})
    for replies in (half, fortran, reshaped, reordered, two_records, []):
        assert weighted_average(replies, "num-examples") is None
        _assert_same_record(fast_aggregate(replies, "num-examples"),
                            fedavg.aggregate_arrayrecords(replies, "num-examples"))
    _assert_same_record(fast_aggregate(base, "num-examples"),
                        fedavg.aggregate_arrayrecords(base, "num-examples"))


def test_fast_aggregate_is_installed_for_fedavg_and_restored():
    original = fedavg.aggregate_arrayrecords
    with fast_flower_records(), fast_flower_records():
        assert fedavg.aggregate_arrayrecords is fast_aggregate
    assert fedavg.aggregate_arrayrecords is original


def test_all_finite_finds_nan_and_inf_in_any_float_array():
    finite = [to_array(a) for a in LAYOUTS]
    assert all_finite(finite) and all_finite([])
    for bad in (np.nan, np.inf, -np.inf):
        for dtype in (np.float32, np.float64, np.float16, np.complex64):
            a = np.zeros((2, 3), dtype)
            a[1, 2] = bad
            assert not all_finite([*finite, to_array(a)]), (bad, dtype)
        fortran = np.asfortranarray(np.array([[0.0, bad], [1.0, 2.0]]))
        assert not all_finite([*finite, Array(fortran)])  # Flower's parser, same verdict
    assert all_finite([to_array(np.array([np.iinfo(np.int64).max]))])  # integers are finite
