"""Nested records as flat rows: the one shape tables and trackers share.

A round record, a summary or a scenario becomes a dict of dotted keys
(``client_accuracy.mean``, ``communication.uploaded.total``, ``hybrid_alpha.<layer>``).
What does not flatten into a fixed set of columns is kept whole as JSON text: lists
(``clients``, ``failures``) and maps keyed by client id (``client_dp.epsilon``), so the row
of a round of 10,000 clients is as narrow as one of 10. None and NaN/Inf are left out.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _per_client(d: dict) -> bool:
    """A map keyed by client ids (``{"3": 0.5, "17": 0.4}``): one JSON cell, not a column
    per client."""
    return bool(d) and all(isinstance(k, str) and k.isdigit() for k in d)


def flatten(record: dict, prefix: str = "") -> dict[str, Any]:
    """``record`` as one flat row: dotted keys for nested dicts, JSON text for lists and
    per-client maps, None values left out (an empty cell)."""
    row: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if value is None:
            continue
        if isinstance(value, dict) and not _per_client(value):
            row.update(flatten(value, name))
        elif isinstance(value, (dict, list, tuple)):
            row[name] = json.dumps(value, sort_keys=True)
        elif isinstance(value, float) and not math.isfinite(value):
            continue  # JSON has no NaN/Inf (written as null): an empty cell too
        else:
            row[name] = value
    return row


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a flat row (bools and text left out), as floats."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
