"""Reading records out of a RecordDict equals Flower's typed views (fedsim.records)."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsim.records import get_record, records_of, require_record


def content():
    return RecordDict({
        "arrays": ArrayRecord([np.zeros(2)]),
        "metrics": MetricRecord({"num-examples": 3}),
        "client": ConfigRecord({"client-id": 7}),
        "more-arrays": ArrayRecord([np.ones(1)]),
    })


@pytest.mark.parametrize("kind, view", [(ArrayRecord, "array_records"),
                                        (MetricRecord, "metric_records"),
                                        (ConfigRecord, "config_records")])
def test_helpers_match_flowers_views(kind, view):
    c = content()
    flower = getattr(c, view)
    assert list(records_of(c, kind)) == list(flower.items())
    for key in c:
        assert get_record(c, key, kind) is flower.get(key)
    assert get_record(c, "absent", kind) is None


def test_require_record_names_what_is_missing():
    c = content()
    assert require_record(c, "client", ConfigRecord)["client-id"] == 7
    with pytest.raises(KeyError, match="no ConfigRecord 'arrays'"):
        require_record(c, "arrays", ConfigRecord)  # present, but not a ConfigRecord
    with pytest.raises(KeyError, match="no ArrayRecord 'weights'"):
        require_record(c, "weights", ArrayRecord)


# -- check_replies: Flower's validate_message_reply_consistency without typed views ---------

from flwr.serverapp.exception import InconsistentMessageReplies  # noqa: E402
from flwr.serverapp.strategy.strategy_utils import (  # noqa: E402
    validate_message_reply_consistency,
)

from fedsim.records import check_replies  # noqa: E402


def _reply(n=3, arrays=("w",), metrics=None, extra=None):
    rd = RecordDict({"arrays": ArrayRecord({k: ArrayRecord([np.zeros(1)])["0"] for k in arrays}),
                     "metrics": MetricRecord(metrics or {"num-examples": n, "loss": 0.5}),
                     "client": ConfigRecord({"client-id": n})})
    for key, record in (extra or {}).items():
        rd[key] = record
    return rd


INCONSISTENT = {
    "fine": [_reply(1), _reply(2)],
    "two array records": [_reply(1), _reply(2, extra={"b": ArrayRecord()})],
    "array keys differ": [_reply(1), _reply(2, arrays=("w", "v"))],
    "two metric records": [_reply(1, extra={"m2": MetricRecord({"x": 1})}), _reply(2)],
    "metric keys differ": [_reply(1), _reply(2, metrics={"num-examples": 2})],
    "no weight key": [_reply(metrics={"n": 1}), _reply(metrics={"n": 2})],
    "weight is a list": [_reply(metrics={"num-examples": [1, 2]})],
    "no array record": [RecordDict({"metrics": MetricRecord({"num-examples": 1})})],
}


@pytest.mark.parametrize("case", list(INCONSISTENT))
@pytest.mark.parametrize("check_arrays", [True, False])
def test_check_replies_raises_what_flower_raises(case, check_arrays):
    replies = INCONSISTENT[case]
    outcomes = []
    for check in (validate_message_reply_consistency, check_replies):
        try:
            check(replies, "num-examples", check_arrays)
            outcomes.append(None)
        except InconsistentMessageReplies as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]
    if case == "fine" or (not check_arrays and "array" in case):
        assert outcomes[0] is None
    else:
        assert outcomes[0]  # every other case is one of Flower's reasons
