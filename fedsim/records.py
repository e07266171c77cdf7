"""Reading records out of a Flower ``RecordDict`` without building its typed views.

``content.array_records`` (and ``metric_records``, ``config_records``) builds a new
synchronised dict of every matching record on each access: tens of microseconds, paid
several times per client message. These helpers read the same records straight from the
``RecordDict``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

from flwr.app import RecordDict

R = TypeVar("R")


def get_record(content: RecordDict, key: str, kind: type[R]) -> R | None:
    """``content.<kind>_records.get(key)``: the record under ``key`` if it is a ``kind``."""
    record = content.get(key)
    return record if isinstance(record, kind) else None


def records_of(content: RecordDict, kind: type[R]) -> Iterator[tuple[str, R]]:
    """``content.<kind>_records.items()``: every (key, record) of type ``kind``, in order."""
    for key, record in content.items():
        if isinstance(record, kind):
            yield key, record


def require_record(content: RecordDict, key: str, kind: type[R]) -> R:
    """``content.<kind>_records[key]``: KeyError naming what is missing if it is absent."""
    record = get_record(content, key, kind)
    if record is None:
        raise KeyError(f"the message has no {kind.__name__} {key!r}")
    return record
