"""Whether two results folders hold the same run: bitwise-equal model, the same round
records and summary apart from timing (what resume and interrupt tests assert)."""

import json
from pathlib import Path

import torch

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
