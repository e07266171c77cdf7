"""Reading records out of a Flower ``RecordDict`` without building its typed views.

``content.array_records`` (and ``metric_records``, ``config_records``) builds a new
synchronised dict of every matching record on each access: tens of microseconds, paid
several times per client message. These helpers read the same records straight from the
``RecordDict``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

from flwr.app import ArrayRecord, MetricRecord, RecordDict

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


def check_replies(replies: list[RecordDict], weighted_by_key: str,
                  check_arrayrecord: bool) -> None:
    """Flower's ``validate_message_reply_consistency``: the same checks in the same order,
    raising the same ``InconsistentMessageReplies`` reasons, reading each reply's records
    with :func:`records_of` instead of four typed views per reply (``msg.array_records``
    builds a ``_SyncedDict[ArrayRecord]`` alias and copies every record into it)."""
    from flwr.serverapp.exception import InconsistentMessageReplies  # the ServerApp's side

    def count(msg: RecordDict, kind: type) -> int:
        return sum(1 for _ in records_of(msg, kind))

    def first_key(msg: RecordDict, kind: type) -> str:
        return next(key for key, _ in records_of(msg, kind))

    if check_arrayrecord:
        if any(count(msg, ArrayRecord) != 1 for msg in replies):
            raise InconsistentMessageReplies(
                reason="Expected exactly one ArrayRecord in replies. Skipping aggregation.")
        record_key = first_key(replies[0], ArrayRecord)
        all_keys = set(replies[0][record_key].keys())
        if any(set(msg.get(record_key, {}).keys()) != all_keys for msg in replies[1:]):
            raise InconsistentMessageReplies(
                reason="All ArrayRecords must have the same keys for aggregation. This "
                       "condition wasn't met. Skipping aggregation.")
    if any(count(msg, MetricRecord) != 1 for msg in replies):
        raise InconsistentMessageReplies(
            reason="Expected exactly one MetricRecord in replies, but found more. Skipping "
                   "aggregation.")
    record_key = first_key(replies[0], MetricRecord)
    all_keys = set(replies[0][record_key].keys())
    if any(set(msg.get(record_key, {}).keys()) != all_keys for msg in replies[1:]):
        raise InconsistentMessageReplies(
            reason="All MetricRecords must have the same keys for aggregation. This "
                   "condition wasn't met. Skipping aggregation.")
    if weighted_by_key not in all_keys:
        raise InconsistentMessageReplies(
            reason=f"Missing required key `{weighted_by_key}` in the MetricRecord of reply "
                   "messages. Cannot average ArrayRecords and MetricRecords. Skipping "
                   "aggregation.")
    if any(isinstance(msg[record_key][weighted_by_key], list) for msg in replies):
        raise InconsistentMessageReplies(
            reason=f"Key `{weighted_by_key}` in the MetricRecord of reply messages must be a "
                   "single value (int or float), but a list was found. Skipping aggregation.")
