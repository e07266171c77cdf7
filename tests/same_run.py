"""Whether two results folders hold the same run: bitwise-equal model, the same round
records and summary apart from timing, audit captures equal bit for bit (what resume and
interrupt tests assert)."""

import json
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedsim.arrays import record_to_state

TIMING = {"seconds", "train_seconds", "bn_seconds"}


def records(path: Path) -> list[dict]:
    """``rounds.jsonl`` without its wall-clock fields."""
    lines = (path / "rounds.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def assert_same_run(ref: Path, other: Path) -> None:
    a = torch.load(ref / "model.pt", weights_only=True, map_location="cpu")
    b = torch.load(other / "model.pt", weights_only=True, map_location="cpu")
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert records(ref) == records(other)
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (ref, other))
    for s in (sa, sb):
        s.pop("timing")
        s.pop("resumed_from", None)
    assert sa == sb


def same_bits(a, b) -> bool:
    """Whether two decoded checkpoint values are equal bit for bit (arrays: dtype and bytes)."""
    if isinstance(a, ArrayRecord):
        return isinstance(b, ArrayRecord) and same_bits(record_to_state(a), record_to_state(b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.tobytes() == b.tobytes() and a.shape == b.shape)
    if isinstance(a, dict):
        return (isinstance(b, dict) and list(a) == list(b)
                and all(same_bits(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(same_bits(x, y) for x, y in zip(a, b)))
    return type(a) is type(b) and (a == b or (a != a and b != b))  # NaN equals NaN here
