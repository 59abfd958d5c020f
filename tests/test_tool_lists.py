"""Tool lists cut out of ingest bodies and shared (ray_app/tool_lists.py): the records stored, their
ids and the PII counts are exactly those of parsing every body whole. Each call through the door
returns its own PII counts, and the door's ToolLists is the only place tool lists are remembered."""
from __future__ import annotations

import copy
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest

from ray_app import ingest as ingest_module
from ray_app import tool_lists as tool_lists_module
from ray_app.config import load_settings
from ray_app.errors import MalformedJSON
from ray_app.governance import pii
from ray_app.ingest import Ingest, IngestResult
from ray_app.schemas import record_id, tools_digest
from ray_app.simulator import generate
from ray_app.tool_lists import ToolLists

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


def _whole() -> Ingest:
    """A door that remembers no tool list: every body parsed whole, every list scrubbed where it is."""
    door = Ingest(SETTINGS)
    door.tool_lists = ToolLists(capacity=0)
    return door


def _both(bodies: list[bytes]) -> tuple[Ingest, list[list[dict]], list[list[dict]]]:
    """The same bodies through a door parsing them whole and through one cutting lists out."""
    whole, cutting = _whole(), Ingest(SETTINGS)
    plain, cut = [whole.body(raw) for raw in bodies], [cutting.body(raw) for raw in bodies]
    assert [r.pii_counts for r in plain] == [r.pii_counts for r in cut]
    return cutting, [r.records for r in plain], [r.records for r in cut]


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
        door.tool_lists.loads(learn)
        assert door.tool_lists._known
        assert orjson.dumps(door.tool_lists.loads(raw)) == orjson.dumps(orjson.loads(raw))


def test_malformed_json_reports_the_clients_own_bytes():
    records = _records("customer-service", 4, 6)
    door = Ingest(SETTINGS)
    door.body(orjson.dumps({"records": records[:2]}))
    raw = orjson.dumps({"records": records[2:]})[:-2] + b",]}"
    with pytest.raises(orjson.JSONDecodeError) as plain:
        orjson.loads(raw)
    with pytest.raises(MalformedJSON) as cut:
        door.body(raw)
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
    parsed = [door.body(raw).records for raw in services + services[:1]]
    assert len(door.tool_lists._known) == 2
    whole = _whole()
    assert [_stored(b) for b in parsed] == [_stored(whole.body(raw).records) for raw in services + services[:1]]


def _with_pii(n: int, seed: int, text: str) -> list[dict]:
    """`n` records, each with `text` in its user message and an address in its tool definitions."""
    records = _records("customer-service", n, seed)
    for r in records:
        r["request"]["messages"][-1]["content"] = text
        r["request"]["tools"][0]["function"]["description"] = "Escalations go to help@example.com"
    return records


def test_each_call_returns_its_own_pii_counts():
    door = Ingest(SETTINGS)
    mails = door.body(orjson.dumps({"records": _with_pii(3, 8, "mail me at jane.doe@example.org")}))
    phones = door.body(orjson.dumps({"records": _with_pii(2, 9, "call (415) 555-2671 or 10.1.2.3")}))
    assert isinstance(mails, IngestResult) and len(mails.records) == 3 and len(phones.records) == 2
    # The tool list's address counts in every record of every call, its scrub remembered or not.
    assert mails.pii_counts == Counter(email=6)
    assert phones.pii_counts == Counter(email=2, phone=2, ip_address=2)
    again = door.records(_with_pii(1, 10, "nothing personal here") + [{"workload_id": "w"}])
    assert again.pii_counts == Counter(email=1) and len(again.records) == 1
    assert [(i, e.field) for i, e in again.rejected] == [(1, "client_id")]
    assert not hasattr(door, "take_pii_counts") and not hasattr(door, "pii_found")


def test_calls_from_several_threads_count_apart():
    door = Ingest(SETTINGS)
    texts = {n: " ".join(f"u{i}@example.org" for i in range(n)) for n in range(1, 5)}

    def post(n: int) -> tuple[int, Counter]:
        records = _records("customer-service", 5, n)
        for r in records:
            r["request"]["messages"][-1]["content"] = texts[n]
        return n, door.body(orjson.dumps({"records": records})).pii_counts

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(post, [1, 2, 3, 4] * 10))
    assert all(counts == Counter(email=5 * n) for n, counts in results)


def test_tool_lists_are_remembered_by_the_door_alone():
    """No module keeps tool lists: only the door's ToolLists, one per door."""
    for module in (pii, tool_lists_module, ingest_module):
        state = {name for name, value in vars(module).items()
                 if not name.startswith("__") and isinstance(value, dict | set | list)}
        # _CLEAN: short strings found clean (a memo of one string's scrub); the rest are constants.
        assert state <= {"_CLEAN", "PLACEHOLDERS", "EXTENSION_SUFFIXES"}, (module.__name__, state)
    assert all(len(text) <= 128 for text in pii._CLEAN)
    door, other = Ingest(SETTINGS), Ingest(SETTINGS)
    door.body(orjson.dumps({"records": _with_pii(4, 11, "hello")}))
    assert door.tool_lists._scrubs and not other.tool_lists._scrubs
    assert any(clean and b"<EMAIL>" in clean for clean, _ in door.tool_lists._scrubs.values())  # its scrub
    assert not door.tool_lists._known  # a list holding personal data is never shared
