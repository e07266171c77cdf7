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
