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
