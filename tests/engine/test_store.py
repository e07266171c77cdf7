"""The client-state store: exact round trips through memory and disk, a memory budget it keeps."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.engine.store import ClientStateStore, encode_state


def state(seed: int, n: int = 50) -> RecordDict:
    rng = np.random.default_rng(seed)
    return RecordDict({
        "local": ArrayRecord({
            "norm.weight": Array(rng.standard_normal(n).astype(np.float32)),
            "norm.num_batches_tracked": Array(np.array(seed, dtype=np.int64)),
            "control": Array(rng.standard_normal((3, 4)).astype(np.float64)),
        }),
        "meta": ConfigRecord({"round": seed, "name": f"client-{seed}", "flag": True,
                              "xs": [1.5, float(seed)]}),
        "m": MetricRecord({"loss": 0.25 * seed}),
    })


def assert_same(a: RecordDict, b: RecordDict) -> None:
    assert list(a) == list(b)
    for key in a:
        ra, rb = a[key], b[key]
        assert type(ra) is type(rb) and list(ra) == list(rb)
        for k in ra:
            va, vb = ra[k], rb[k]
            if isinstance(va, Array):
                x, y = va.numpy(), vb.numpy()
                assert x.dtype == y.dtype and x.shape == y.shape
                assert x.tobytes() == y.tobytes()  # bitwise
            else:
                assert va == vb and type(va) is type(vb)


def test_round_trip_exact_in_memory_and_after_spilling(tmp_path):
    one = len(encode_state(state(0)))
    store = ClientStateStore(memory_budget=3 * one, spill_dir=tmp_path)
    for cid in range(10):
        store.put(cid, state(cid))
        assert store.memory_bytes <= store.memory_budget
    assert len(store) == 10 and store.spills == 7
    on_disk = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    assert store.disk_bytes <= on_disk <= store.file_bytes  # one file, one slot per client
    for cid in range(10):  # the oldest come back from disk, the newest from memory
        assert_same(store.get(cid), state(cid))
    assert store.loads == 7
    assert store.memory_bytes + store.disk_bytes == sum(len(encode_state(state(c)))
                                                        for c in range(10))


def test_budget_zero_keeps_everything_on_disk_and_get_returns_copies(tmp_path):
    store = ClientStateStore(memory_budget=0, spill_dir=tmp_path)
    store.put(7, state(7))
    assert store.memory_bytes == 0 and store.disk_bytes > 0
    got = store.get(7)
    got["meta"]["round"] = 999  # mutating a copy does not change the store
    assert store.get(7)["meta"]["round"] == 7


def test_a_state_spilled_again_reuses_its_slot(tmp_path):
    store = ClientStateStore(memory_budget=0, spill_dir=tmp_path)
    for _ in range(5):  # load and spill the same two clients again and again
        for cid in (1, 2):
            store.put(cid, store.get(cid) if cid in store else state(cid))
    size = store.file_bytes
    store.put(1, store.get(1))
    assert store.file_bytes == size and store.spills == 11 and store.loads == 9
    assert_same(store.get(1), state(1))


def test_update_delete_and_empty_state(tmp_path):
    store = ClientStateStore(memory_budget=10**6, spill_dir=tmp_path)
    store.put(1, state(1))
    store.put(1, state(2))
    assert_same(store.get(1), state(2))
    assert len(store) == 1
    store.put(1, RecordDict())  # an empty state is no state
    assert 1 not in store and len(store) == 0 and store.memory_bytes == 0
    assert len(store.get(1)) == 0


def test_close_removes_the_spill_folder(tmp_path):
    store = ClientStateStore(memory_budget=0, spill_dir=tmp_path)
    store.put(1, state(1))
    assert any(tmp_path.iterdir())
    store.close()
    assert not any(tmp_path.iterdir()) and len(store) == 0


def test_negative_budget_is_refused():
    with pytest.raises(ValueError, match="memory_budget"):
        ClientStateStore(-1)


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 60)), min_size=1, max_size=40),
       budget=st.integers(0, 4000))
def test_accounting_stays_under_budget_and_matches_a_dict(tmp_path_factory, ops, budget):
    """Random puts (size 0 = delete) against a plain dict: same contents, budget kept."""
    store = ClientStateStore(memory_budget=budget, spill_dir=tmp_path_factory.mktemp("s"))
    ref: dict[int, RecordDict] = {}
    for cid, n in ops:
        st_ = RecordDict() if n == 0 else state(cid * 100 + n, n)
        store.put(cid, st_)
        if n == 0:
            ref.pop(cid, None)
        else:
            ref[cid] = st_
        assert store.memory_bytes <= budget
    assert store.keys() == sorted(ref)
    for cid, expected in ref.items():
        assert_same(store.get(cid), expected)
    store.close()


def arrays_state(seed: int) -> RecordDict:
    rng = np.random.default_rng(seed)
    return RecordDict({
        "local-arrays": ArrayRecord({
            "bn.weight": Array(rng.standard_normal(8).astype(np.float32)),
            "bn.num_batches_tracked": Array(np.array(seed, dtype=np.int64)),
            "c": Array(rng.standard_normal((2, 0, 3))),
            "fortran": Array(np.asfortranarray(rng.standard_normal((3, 2)))),
        }),
        "empty": ArrayRecord(),
        "control": ArrayRecord({"w": Array(rng.integers(0, 9, (4, 1), dtype=np.uint8))}),
    })


def test_arrays_only_states_use_the_flat_encoding_and_round_trip_exactly():
    from flwr.common.serde import recorddict_to_proto

    from fedsim.engine.store import decode_state

    s = arrays_state(3)
    data = encode_state(s)
    assert data.startswith(b"\x00fsA")  # not protobuf
    back = decode_state(data)
    assert_same(back, s)
    for key in s:  # every field of every Array, not only the values
        assert [vars(a) for a in back[key].values()] == [vars(a) for a in s[key].values()]
    # bytes written by earlier versions (Flower's protobuf) still decode: old checkpoints
    assert_same(decode_state(recorddict_to_proto(s).SerializeToString()), s)
    with pytest.raises(ValueError, match="left over"):
        decode_state(data + b"x")


def test_names_the_flat_header_cannot_hold_fall_back_to_protobuf():
    from fedsim.engine.store import decode_state

    s = RecordDict({"odd\nrecord": ArrayRecord({"a\x1fb": Array(np.arange(3.0))})})
    data = encode_state(s)
    assert not data.startswith(b"\x00")
    assert_same(decode_state(data), s)
