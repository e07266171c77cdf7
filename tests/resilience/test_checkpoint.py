"""Checkpoint files: exact round trips, generic strategy state, atomic writes, damage detected."""

import json
import os

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
)

from fedsim.checkpoint import (
    PREVIOUS,
    Checkpointer,
    encode_checkpoint,
    load_checkpoint,
    read_checkpoint,
    scenario_digest,
    write_checkpoint,
)
from fedsim.config import Scenario
from fedsim.errors import CheckpointError


def arrays(seed=0):
    rng = np.random.default_rng(seed)
    return ArrayRecord({"w": Array(rng.normal(size=(3, 2)).astype(np.float32)),
                        "n": Array(np.array(7, dtype=np.int64))})


def same_record(a, b):
    assert list(a) == list(b)
    for k in a:
        assert (a[k].dtype, a[k].shape, a[k].stype, a[k].data) == \
            (b[k].dtype, b[k].shape, b[k].stype, b[k].data), k


class Holder:
    """A strategy-like object with every kind of data attribute."""

    def __init__(self):
        self.f, self.i, self.s, self.b, self.none = 0.1 + 0.2, 2**70, "é✓", True, None
        self.nan, self.raw = float("nan"), b"\x00\x01"
        self.nd = {"a": np.arange(6, dtype=np.float64).reshape(2, 3),
                   "z": np.zeros((0, 4), dtype=np.uint16), "0d": np.array(3.5, dtype=np.float16)}
        self.scalar = np.float32(1.25)
        self.tensors = [torch.arange(4, dtype=torch.bfloat16), torch.tensor(True)]
        self.nested = {1: ("x", [2.5, {"k": None}]), (2, "b"): -1}
        self.records = RecordDict({
            "arrays": arrays(), "cfg": ConfigRecord({"s": "v", "l": [1, 2], "by": [b"a"]}),
            "met": MetricRecord({"x": 1.5, "xs": [1.0, 2.0]})})
        self.fn = lambda x: x  # configuration: skipped


def roundtrip(tmp_path, strategy, fresh, clients=None):
    payload = encode_checkpoint(3, arrays(), strategy, clients, {"note": "x"})
    path = write_checkpoint(tmp_path, payload)
    ckpt = read_checkpoint(path)
    ckpt.restore_strategy(fresh)
    return ckpt


def test_every_kind_of_value_round_trips_exactly(tmp_path):
    src, dst = Holder(), Holder()
    for name in ("f", "i", "nd", "scalar", "tensors", "nested", "records", "raw", "nan"):
        setattr(dst, name, None)
    clients = {5: RecordDict({"c": ConfigRecord({"n": 4})}), 9: src.records}
    ckpt = roundtrip(tmp_path, src, dst, clients)
    assert ckpt.round == 3 and ckpt.meta["note"] == "x"
    same_record(ckpt.arrays, arrays())
    assert dst.f == src.f and dst.i == 2**70 and dst.s == "é✓" and dst.raw == b"\x00\x01"
    assert np.isnan(dst.nan)
    for k, v in src.nd.items():
        assert dst.nd[k].dtype == v.dtype and np.array_equal(dst.nd[k], v)
    assert type(dst.scalar) is np.float32 and dst.scalar == np.float32(1.25)
    assert dst.tensors[0].dtype == torch.bfloat16 and torch.equal(dst.tensors[0], src.tensors[0])
    assert dst.tensors[1].item() is True and dst.tensors[1].shape == ()
    assert dst.nested == src.nested
    same_record(dst.records["arrays"], src.records["arrays"])
    assert dict(dst.records["cfg"]) == dict(src.records["cfg"])
    assert dict(dst.records["met"]) == dict(src.records["met"])
    assert set(ckpt.clients) == {5, 9} and ckpt.clients[5]["c"]["n"] == 4


def test_file_loads_with_weights_only_and_holds_no_pickled_objects(tmp_path):
    path = write_checkpoint(tmp_path, encode_checkpoint(1, arrays(), FedAdam(), None, {}))
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"format", "version", "tree", "blob", "sha256"}
    assert payload["blob"].dtype == torch.uint8 and isinstance(payload["tree"], str)


def test_fedadam_moments_restore_exactly_and_resume_the_same_step(tmp_path):
    """FedAdam's m_t / v_t are restored bitwise, so the next aggregation is identical."""
    strategy = FedAdam(eta=0.1)
    strategy.current_arrays = {k: v.numpy() for k, v in arrays(0).items()}
    strategy.m_t = {k: np.full_like(v.numpy(), 0.3, dtype=v.numpy().dtype)
                    for k, v in arrays(1).items()}
    strategy.v_t = {k: v.numpy() ** 2 for k, v in arrays(2).items()}
    fresh = FedAdam(eta=0.1)
    roundtrip(tmp_path, strategy, fresh)
    for name in ("m_t", "v_t", "current_arrays"):
        got, want = getattr(fresh, name), getattr(strategy, name)
        assert list(got) == list(want)
        assert all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k])
                   for k in want), name


def test_fedavgm_momentum_and_wrapped_dp_strategy_state(tmp_path):
    m = FedAvgM(server_momentum=0.9)
    m.current_arrays, m.momentum_vector = arrays(3), [np.ones(2), np.zeros(3)]
    fresh = FedAvgM(server_momentum=0.9)
    roundtrip(tmp_path, m, fresh)
    same_record(fresh.current_arrays, m.current_arrays)
    assert [v.tolist() for v in fresh.momentum_vector] == [[1, 1], [0, 0, 0]]

    dp = DifferentialPrivacyServerSideAdaptiveClipping(FedAdam(), 0.1, 3)
    dp.clipping_norm = 0.123456789
    dp.strategy.m_t = {"w": np.ones(2)}
    fresh = DifferentialPrivacyServerSideAdaptiveClipping(FedAdam(), 0.1, 3)
    roundtrip(tmp_path, dp, fresh)
    assert fresh.clipping_norm == 0.123456789 and fresh.strategy.m_t["w"].tolist() == [1, 1]


def test_a_torch_module_attribute_is_saved_as_its_state_dict(tmp_path):
    src, dst = FedAvg(), FedAvg()
    src.net, dst.net = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        src.net.weight.fill_(0.25)
    roundtrip(tmp_path, src, dst)
    assert isinstance(dst.net.weight, torch.nn.Parameter)
    assert torch.equal(dst.net.weight, src.net.weight) and torch.equal(dst.net.bias, src.net.bias)


def test_state_that_is_not_data_is_an_error_naming_it(tmp_path):
    import threading

    strategy = FedAvg()
    strategy.lock = threading.Lock()
    with pytest.raises(CheckpointError, match=r"strategy\.lock"):
        encode_checkpoint(1, arrays(), strategy, None, {})
    other = FedAvg()
    other.cache = [threading.Lock()]
    with pytest.raises(CheckpointError, match=r"strategy\.cache\[0\]"):
        encode_checkpoint(1, arrays(), other, None, {})


def test_restoring_into_another_strategy_class_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="FedAdam"):
        roundtrip(tmp_path, FedAdam(), FedAvg())


def test_write_is_atomic_and_keeps_the_previous_checkpoint(tmp_path):
    write_checkpoint(tmp_path, encode_checkpoint(1, arrays(1), FedAvg(), None, {}))
    write_checkpoint(tmp_path, encode_checkpoint(2, arrays(2), FedAvg(), None, {}))
    assert read_checkpoint(tmp_path / "checkpoint.pt").round == 2
    assert read_checkpoint(tmp_path / PREVIOUS).round == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint.pt", PREVIOUS])


def test_a_write_that_dies_midway_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, encode_checkpoint(1, arrays(1), FedAvg(), None, {}))

    def dying_save(obj, fh):
        fh.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # e.g. Ctrl-C or a kill while writing

    monkeypatch.setattr("fedsim.checkpoint.torch.save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, encode_checkpoint(2, arrays(2), FedAvg(), None, {}))
    assert read_checkpoint(tmp_path / "checkpoint.pt").round == 1
    # the newest complete checkpoint was linked as the previous one before the write began
    assert read_checkpoint(tmp_path / PREVIOUS).round == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint.pt", PREVIOUS])


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_checkpoint_is_detected_naming_the_file(tmp_path, damage):
    path = write_checkpoint(tmp_path, encode_checkpoint(2, arrays(), FedAdam(), None, {}))
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":  # a byte inside the stored blob: only the digest can notice
        payload = torch.load(path, weights_only=True)
        needle = payload["blob"].numpy().tobytes()[:64]
        raw[raw.index(needle) + 10] ^= 0xFF
    elif damage == "garbage":
        raw = bytearray(b"not a checkpoint at all")
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert str(path) in str(err.value)
    assert any(w in str(err.value) for w in ("corrupted", "truncated"))


class Sink:
    """The run folder's checkpoint interface (checkpoint.RoundsLog), on a hand-written
    rounds.jsonl."""

    def __init__(self, out, records):
        self.out, self.records, self.resumed_from = out, records, []
        (out / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def rounds_position(self):
        return len(self.records), (self.out / "rounds.jsonl").stat().st_size

    def elapsed(self):
        return 1.5

    def on_checkpoint(self, seconds, size):
        pass


def checkpointed_folder(tmp_path, rounds=2, strategy=None):
    scn = Scenario()
    sink = Sink(tmp_path, [{"round": r} for r in range(rounds + 1)])
    save = Checkpointer(sink, scn, strategy or FedAvg(), grid=None)
    for r in range(rounds + 1):
        sink.records = [{"round": i} for i in range(r + 1)]
        (tmp_path / "rounds.jsonl").write_text(
            "".join(json.dumps(x) + "\n" for x in sink.records))
        save(r, arrays(r))
    return scn


def test_resume_falls_back_to_the_previous_checkpoint_and_reports_the_bad_one(tmp_path):
    scn = checkpointed_folder(tmp_path)
    latest = tmp_path / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:100])
    warnings = []
    ckpt = load_checkpoint(tmp_path, scn, warn=warnings.append)
    assert ckpt.round == 1 and ckpt.rounds == [{"round": 0}, {"round": 1}]
    assert len(warnings) == 1 and "checkpoint.pt" in warnings[0] and PREVIOUS in warnings[0]
    assert (tmp_path / "checkpoint.bad.pt").exists() and not latest.exists()
    # both damaged: an error naming both files
    (tmp_path / PREVIOUS).write_bytes(b"x")
    (tmp_path / "checkpoint.pt").write_bytes(b"y")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt.*checkpoint\.prev\.pt"):
        load_checkpoint(tmp_path, scn)


def test_resume_checks_rounds_jsonl_and_the_scenario(tmp_path):
    scn = checkpointed_folder(tmp_path)
    assert load_checkpoint(tmp_path, scn).round == 2
    other = Scenario(seed=1)
    assert scenario_digest(other) != scenario_digest(scn)
    with pytest.raises(CheckpointError, match="another scenario"):
        load_checkpoint(tmp_path, other)
    rounds = tmp_path / "rounds.jsonl"
    with open(rounds, "r+b") as fh:
        fh.truncate(os.path.getsize(rounds) - 3)
    with pytest.raises(CheckpointError, match="rounds.jsonl"):
        load_checkpoint(tmp_path, scn)


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        load_checkpoint(tmp_path, Scenario())


def test_stateful_clients_on_an_engine_without_state_export_refuse_to_resume(tmp_path):
    """Ray keeps Context.state inside Flower: fedsim cannot save it, so it will not pretend."""
    scn = Scenario()
    sink = Sink(tmp_path, [{"round": 0}, {"round": 1}])
    save = Checkpointer(sink, scn, FedAvg(), grid=object())  # no export_states: like Ray
    save(1, arrays(), stateful=True)
    with pytest.raises(CheckpointError, match="cannot checkpoint"):
        load_checkpoint(tmp_path, scn)
    save(1, arrays(), stateful=False)  # a sticky flag: once stateful, always refused
    with pytest.raises(CheckpointError, match="keep state"):
        load_checkpoint(tmp_path, scn)
