"""Record ids sort by time: derived ones by the record's timestamp, the client's by when it logged."""
from __future__ import annotations

import copy
import time

from ray_app.client.core import new_record_id
from ray_app.schemas import normalize, record_id
from tests.workloads import customer_service_records


def test_derived_ids_lead_with_the_records_own_time_and_stay_content_derived():
    base = copy.deepcopy(customer_service_records(1, seed=2)[0])
    base.pop("id", None)
    at = [dict(base, timestamp=t) for t in (1_700_000_000, 1_700_000_000.9, 1_700_000_001, 1_800_000_000)]
    ids = [record_id(r) for r in at]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert ids[0][:10] == ids[1][:10] == f"{1_700_000_000:010x}" and ids[0] != ids[1]  # same second, other content
    assert ids[1:] == sorted(ids[1:]) and len(set(ids)) == 4  # within one second the hash orders them
    assert record_id(copy.deepcopy(at[2])) == ids[2]  # a re-post keeps its id
    iso = dict(base, timestamp="2023-11-14T22:13:20Z")  # 1_700_000_000 written as ISO-8601
    assert record_id(iso)[:10] == ids[0][:10] and record_id(iso) != ids[0]
    assert record_id(dict(base, timestamp=None))[:10] == "0" * 10
    assert record_id(dict(base, timestamp="not a time"))[:10] == "0" * 10
    stored = normalize(dict(base, timestamp=1_700_000_000), constitutional_hash="cdd01ef066bc6cf2")
    assert stored["id"] == ids[0]


def test_client_ids_sort_by_when_they_were_made_and_hold_no_digit(monkeypatch):
    clock = iter([1_700_000_000_000, 1_700_000_000_000, 1_700_000_000_001, 1_700_000_123_456])

    class Clock:  # the client module's view of `time` only: its sender threads keep the real one
        def __getattr__(self, name):
            return getattr(time, name)

        def time_ns(self):
            return next(clock) * 1_000_000

    monkeypatch.setattr("ray_app.client.core.time", Clock())
    ids = [new_record_id() for _ in range(4)]
    assert all(len(i) == 32 and set(i) <= set("abcdefghijklmnop") for i in ids)
    assert ids[0][:12] == ids[1][:12] and ids[0] != ids[1]  # the same millisecond: the random part differs
    assert ids[1][:12] < ids[2][:12] < ids[3][:12]
    # the letters keep the digits' order, so the time part decodes back
    decoded = int(ids[3][:12].translate(str.maketrans("abcdefghijklmnop", "0123456789abcdef")), 16)
    assert decoded == 1_700_000_123_456
