"""Public function-calling data as log records (train/public_data.py, train/nestful.py): records the
ingest path accepts, short tool lists holding every called tool, resolved multi-turn targets."""
from __future__ import annotations

import json

import jsonschema
import pytest

from ray_app.schemas import check_record, parse_ingest_body
from train import public_data
from train.nestful import first_round, resolve, second_turn
from train.public_data import SOURCES, load_source, normalize_text, public_examples, tool_spec


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict]]:
    """Every source once (complexfuncbench's two 100 MB files take ~2-3 s; the rest milliseconds)."""
    return {name: load_source(name) for name in SOURCES}


def _answer(record: dict) -> list[dict]:
    return record["response"]["choices"][0]["message"]["tool_calls"]


def _called(record: dict) -> set[str]:
    history = [c for m in record["request"]["messages"] for c in m.get("tool_calls") or []]
    return {c["function"]["name"] for c in history + _answer(record)}


def test_every_record_has_the_ingest_shape(records):
    for name, recs in records.items():
        assert recs, name
        for record in recs:
            check_record(record)
            assert record["workload_id"] == f"nestful-{name}" and record["request"]["model"] == "production"
            for call in _answer(record):
                assert isinstance(json.loads(call["function"]["arguments"]), dict)  # a JSON string, as OpenAI sends
        stored = parse_ingest_body({"records": recs[:20]}, constitutional_hash="h", max_records=100)
        assert [r["id"] for r in stored] == [r["id"] for r in recs[:20]]  # the ids given are kept
        assert len({r["id"] for r in recs}) == len(recs)


def test_tool_lists_are_short_hold_every_called_tool_and_are_valid_schemas(records):
    for recs in records.values():
        for record in recs:
            listed = [t["function"]["name"] for t in record["request"]["tools"]]
            assert 1 <= len(listed) <= public_data.MAX_TOOLS and len(set(listed)) == len(listed)
            assert _called(record) <= set(listed), record["id"]
    sizes = {len(r["request"]["tools"]) for recs in records.values() for r in recs}
    assert sizes == {1, 2, 3, 4}  # distractors are drawn, not fixed
    for tool in {json.dumps(t) for r in records["glaive"] + records["sgd"] for t in r["request"]["tools"]}:
        jsonschema.Draft202012Validator.check_schema(json.loads(tool)["function"]["parameters"])


def test_shapes_single_parallel_and_multi_turn(records):
    glaive = records["glaive"]
    assert sum(len(_answer(r)) > 1 for r in glaive) > 50  # parallel answers: several independent calls
    assert all(len(r["request"]["messages"]) == 1 for r in glaive)  # no results recorded: single-turn only
    multi = [r for r in records["complexfuncbench"] if r["id"].endswith("-1")]
    assert len(multi) > 500
    for record in multi:
        messages = record["request"]["messages"]
        assert [m["role"] for m in messages[:2]] == ["user", "assistant"]
        calls = messages[1]["tool_calls"]
        assert [m["tool_call_id"] for m in messages[2:]] == [c["id"] for c in calls]
        assert all(m["role"] == "tool" and len(m["content"]) <= public_data.TOOL_RESULT_CHARS + 4
                   for m in messages[2:])
        assert "$var" not in json.dumps(record)  # every reference resolved, in history and target
        assert {c["id"] for c in _answer(record)}.isdisjoint({c["id"] for c in calls})


def test_a_resolved_value_is_the_one_the_tool_returned():
    calls = [{"name": "find", "label": "var1", "arguments": {"q": "La Jolla"},
              "response": [{"coordinates": {"latitude": 32.87, "longitude": -117.2}, "name": "La Jolla"}]},
             {"name": "book", "label": "var2", "arguments": {"lat": "$var1.coordinates.latitude$", "n": 2},
              "response": {"ok": True}}]
    turn = second_turn(calls, "Book near La Jolla", max_chars=600)
    assert turn is not None and turn.second[0]["arguments"] == {"lat": 32.87, "n": 2}
    assert second_turn(calls, "Book near La Jolla", max_chars=20) is None  # the value did not survive the cut
    two = [{"id": 1}, {"id": 2}]
    assert resolve(two, "id") is not resolve(two, "0.id") and resolve(two, "0.id") == 1  # ambiguous unless indexed
    assert resolve([{"id": 1}, {"name": "x"}], "id") == 1


def test_a_literal_copied_from_an_earlier_result_is_not_answerable_at_once():
    calls = [{"name": "search", "label": "var1", "arguments": {"city": "Paris"}, "response": [{"hotel_id": 58812}]},
             {"name": "details", "label": "var2", "arguments": {"hotel_id": 58812}, "response": {}},
             {"name": "weather", "label": "var3", "arguments": {"city": "Paris"}, "response": {}}]
    assert first_round(calls, "Hotels in Paris, the first one's details, and the weather") == [0, 2]
    turn = second_turn(calls, "Hotels in Paris", max_chars=600)
    assert turn is not None and [c["name"] for c in turn.second] == ["details"]


def test_loads_are_deterministic_and_independent_copies(records):
    again = load_source("complexfuncbench")
    assert again == records["complexfuncbench"]
    again[0]["request"]["messages"].clear()
    assert load_source("complexfuncbench")[0]["request"]["messages"]  # callers cannot corrupt the cache
    public_data._built.cache_clear()  # the small sources rebuilt from their files (complexfuncbench: 3 s more)
    for name in ("glaive", "sgd", "executable"):
        assert load_source(name) == records[name]  # the same distractors drawn


def test_tool_spec_maps_each_sources_parameter_format():
    tool = tool_spec({"name": "Buses.FindBus", "description": "Find a bus ", "query_parameters": {
        "origin": {"description": "From", "required": True, "allowed_values": []},
        "group_size": {"description": "Size", "required": False, "allowed_values": ["1", "2"]},
        "date": {"type": "Date (yyyy-mm-dd)", "description": "When", "required": None, "optional": True},
        "n": {"type": "int", "description": "How many", "required": True, "enum": []},
        "span": {"type": "object", "description": "Range", "required": True, "properties": {
            "start": {"type": "string", "description": "Start", "required": True}, "end": {"type": "string"}}}}})
    function = tool["function"]
    assert function["name"] == "Buses.FindBus" and function["description"] == "Find a bus"
    params = function["parameters"]
    jsonschema.Draft202012Validator.check_schema(params)
    assert params["required"] == ["origin", "n", "span"]
    props = params["properties"]
    assert props["origin"] == {"type": "string", "description": "From"}
    assert props["group_size"]["enum"] == ["1", "2"] and props["date"]["type"] == "string"
    assert props["n"] == {"type": "integer", "description": "How many"}
    assert props["span"]["required"] == ["start"] and set(props["span"]["properties"]) == {"start", "end"}


def test_public_examples_are_curated_and_exclude_by_normalized_text(records):
    examples = public_examples(["sgd", "glaive"])
    assert len(examples) == len(records["sgd"]) + len(records["glaive"])
    for e in examples[:30]:
        calls = _answer(e["record"])
        assert e["workload_type"] == "tool_calling" and e["tool"] == calls[0]["function"]["name"]
        assert all(isinstance(c["function"]["arguments"], dict) for c in calls)  # parsed, as curation stores them
        assert e["user_text"] == e["record"]["request"]["messages"][-1]["content"]
    texts = [e["user_text"] for e in examples[:5]]
    mangled = {"  " + t.upper().replace(" ", "\n ") + " " for t in texts}
    kept = public_examples(["sgd", "glaive"], exclude_user_texts=mangled)
    assert {e["id"] for e in examples} - {e["id"] for e in kept} == {e["id"] for e in examples
                                                                      if e["user_text"] in texts}
    assert not {normalize_text(t) for t in texts} & {normalize_text(e["user_text"]) for e in kept}
    assert public_examples(["sgd", "glaive"], limit=7, seed=3) == public_examples(["sgd", "glaive"], seed=3)[:7]
    assert [e["id"] for e in public_examples(["sgd"], seed=1)] != [e["id"] for e in public_examples(["sgd"], seed=2)]
