"""Tool lists cut out of ingest bodies and shared (ray_app/tool_lists.py): the records stored, their
ids and the PII counts are exactly those of parsing every body whole."""
from __future__ import annotations

import copy
import json

import orjson
import pytest

from ray_app.config import load_settings
from ray_app.errors import MalformedJSON
from ray_app.ingest import Ingest
from ray_app.schemas import record_id, tools_digest
from ray_app.simulator import generate

SETTINGS = load_settings(env={})
ENCODINGS = {
    "orjson": orjson.dumps,
    "python-json": lambda obj: json.dumps(obj).encode(),
    "python-json-utf8": lambda obj: json.dumps(obj, ensure_ascii=False).encode(),
}


def _records(service: str, n: int, seed: int) -> list[dict]:
    """Fresh copies: the simulator's records share their tool list with each other."""
    return orjson.loads(orjson.dumps(list(generate(service, n, seed=seed))))


def _stored(records: list[dict]) -> list[bytes]:
    # Without the timestamp: a record sent without one is stamped with the time it arrived.
    return [orjson.dumps({k: v for k, v in r.items() if k != "timestamp"}, option=orjson.OPT_SORT_KEYS)
            for r in records]


def _both(bodies: list[bytes]) -> tuple[Ingest, list[list[dict]], list[list[dict]]]:
    """The same bodies through a door parsing them whole and through one cutting lists out."""
    whole, cutting = Ingest(SETTINGS), Ingest(SETTINGS)
    plain = [whole.body(orjson.loads(raw)) for raw in bodies]
    cut = [cutting.body(cutting.parse(raw)) for raw in bodies]
    assert whole.take_pii_counts() == cutting.take_pii_counts()
    return cutting, plain, cut


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_records_and_ids_match_parsing_whole(encoding):
    records = _records("customer-service", 300, 3) + _records("generic-assistant", 60, 3)
    for r in records[::7]:
        r.pop("timestamp", None)  # ids then come from content alone, the path the cut list speeds up
    encode = ENCODINGS[encoding]
    bodies = [encode({"records": records[i:i + 120]}) for i in range(0, len(records), 120)]
    bodies.append(encode(records[5]))  # a single record, not a batch
    door, plain, cut = _both(bodies)
    assert [_stored(b) for b in cut] == [_stored(b) for b in plain]
    shared = [r["request"]["tools"] for r in cut[1] if "tools" in r["request"]]
    assert shared and all(t is shared[0] for t in shared)  # one object, put back in every record
    assert door.tool_lists.known(shared[0]) is not None


def test_a_list_holding_personal_data_is_never_kept():
    records = _records("customer-service", 40, 4)
    for r in records:
        r["request"]["tools"][0]["function"]["description"] = "Escalations go to jane.doe@example.com"
    bodies = [orjson.dumps({"records": records[i:i + 20]}) for i in (0, 20)]
    door, plain, cut = _both(bodies)
    assert [_stored(b) for b in cut] == [_stored(b) for b in plain]
    assert "<EMAIL>" in cut[1][0]["request"]["tools"][0]["function"]["description"]
    assert not door.tool_lists._known  # scrubbed per record, never held


def test_the_same_bytes_under_another_key_parse_as_sent():
    records = _records("customer-service", 20, 5)
    tools = records[0]["request"]["tools"]
    learn = orjson.dumps({"records": records[:10]})
    for odd in (lambda r: r["response"].update(tools=tools),  # the list's bytes where no list is put back
                lambda r: r["request"].update({'a "tools': tools})):  # behind an escaped quote inside a key
        batch = [dict(r, request=dict(r["request"]), response=dict(r["response"])) for r in records[10:]]
        odd(batch[3])
        raw = orjson.dumps({"records": batch})
        door = Ingest(SETTINGS)
        door.parse(learn)
        assert door.tool_lists._known
        assert orjson.dumps(door.parse(raw)) == orjson.dumps(orjson.loads(raw))


def test_malformed_json_reports_the_clients_own_bytes():
    records = _records("customer-service", 4, 6)
    door = Ingest(SETTINGS)
    door.parse(orjson.dumps({"records": records[:2]}))
    raw = orjson.dumps({"records": records[2:]})[:-2] + b",]}"
    with pytest.raises(orjson.JSONDecodeError) as plain:
        orjson.loads(raw)
    with pytest.raises(MalformedJSON) as cut:
        door.parse(raw)
    assert str(plain.value) in cut.value.message


def test_record_id_with_a_known_digest_equals_the_derived_one():
    record = _records("customer-service", 1, 7)[0]
    tools = record["request"]["tools"]
    known = (tools, tools_digest(tools))
    assert record_id(record, known_tools=known) == record_id(record)
    other = copy.deepcopy(record)
    other["request"]["tools"][0]["function"]["name"] += "_v2"  # another list: the digest given is not used
    assert record_id(other, known_tools=known) == record_id(other) != record_id(record)
    # The same list in a new object (another body's parse) hashes to the same id.
    assert record_id(copy.deepcopy(record)) == record_id(record)


def test_least_recent_lists_leave_a_full_cache():
    door = Ingest(SETTINGS)
    door.tool_lists._capacity = 2
    services = []
    for n in range(3):  # three services, each with its own list
        records = _records("customer-service", 10, n)
        for r in records:
            r["request"]["tools"][0]["function"]["name"] = f"lookup_{n}"
        services.append(orjson.dumps({"records": records}))
    parsed = [door.body(door.parse(raw)) for raw in services + services[:1]]
    assert len(door.tool_lists._known) == 2
    whole = Ingest(SETTINGS)
    assert [_stored(b) for b in parsed] == [_stored(whole.body(orjson.loads(raw))) for raw in services + services[:1]]
