"""POST/GET /v1/logs, /v1/workloads, feedback and /metrics through the real Serve app."""
from __future__ import annotations

import concurrent.futures as cf

import orjson

from tests.conftest import chat_record


def test_healthz_needs_no_key(api, app_url):
    import httpx

    assert httpx.get(f"{app_url}/healthz").json() == {"status": "ok"}


def test_single_and_batch_posts_are_stored_once_each(api, workload_id):
    """The issue's bar: 1,000 in batches + 200 singles + the same 200 again = exactly 1,200."""
    batch = [chat_record(workload_id, i) for i in range(1000)]
    for start in range(0, 1000, 250):
        r = api.post("/v1/logs", json={"records": batch[start:start + 250]})
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 250
    singles = [chat_record(workload_id, 1000 + i) for i in range(200)]
    first_ids = [api.post("/v1/logs", json=rec).json()["ids"][0] for rec in singles]
    again = [api.post("/v1/logs", json=rec).json() for rec in singles]
    assert [a["ids"][0] for a in again] == first_ids
    assert all(a["duplicates"] == 1 for a in again)

    counts = {w["workload_id"]: w["count"] for w in api.get("/v1/workloads").json()}
    assert counts[workload_id] == 1200
    records = api.get("/v1/logs", params={"workload_id": workload_id, "limit": 5000}).json()["records"]
    assert len(records) == 1200
    assert len({r["id"] for r in records}) == 1200
    assert records[0]["timestamp"] >= records[-1]["timestamp"]  # newest first


def test_stored_record_is_normalized(api, workload_id):
    tool = {"workload_id": workload_id, "client_id": "c1", "timestamp": "2025-01-02T03:04:05Z",
            "request": {"messages": [{"role": "user", "content": "where is ORD-1?"}], "tools": [{"type": "function"}]},
            "response": {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "get_order", "arguments": "{\"id\": 1}"}}]}}]}}
    rid = api.post("/v1/logs", json=tool).json()["ids"][0]
    stored = api.get("/v1/logs", params={"workload_id": workload_id}).json()["records"][0]
    assert stored["id"] == rid
    assert stored["workload_type"] == "tool_calling"  # detected from the response
    assert stored["constitutional_hash"] == "cdd01ef066bc6cf2"
    assert stored["timestamp"] == 1735787045.0
    assert stored["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "{\"id\": 1}"


def test_client_supplied_ids_are_idempotent(api, workload_id):
    recs = [chat_record(workload_id, i, id=f"fixed-{workload_id}-{i}") for i in range(5)]
    assert api.post("/v1/logs", json={"records": recs}).json()["duplicates"] == 0
    # The same ids with different content are still the same records: first write wins.
    changed = [dict(r, response={"choices": [{"message": {"role": "assistant", "content": "x"}}]}) for r in recs]
    assert api.post("/v1/logs", json={"records": changed}).json()["duplicates"] == 5
    stored = api.get("/v1/logs", params={"workload_id": workload_id}).json()["records"]
    assert {r["response"]["choices"][0]["message"]["content"] for r in stored} == {f"answer {i}" for i in range(5)}


def test_concurrent_writers_with_overlapping_records(api, workload_id):
    records = [chat_record(workload_id, i) for i in range(400)]

    def post(offset: int) -> int:
        chunk = records[offset:offset + 200]  # every record is posted by two writers
        return api.post("/v1/logs", json={"records": chunk}).status_code

    with cf.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(post, [0, 100, 200, 0, 100, 200, 50, 150]))
    assert codes == [200] * 8
    assert {w["workload_id"]: w["count"] for w in api.get("/v1/workloads").json()}[workload_id] == 400


def test_feedback_is_stored_with_the_record(api, workload_id):
    rid = api.post("/v1/logs", json=chat_record(workload_id, 1)).json()["ids"][0]
    r = api.post(f"/v1/logs/{rid}/feedback", json={"rating": 5, "comment": "great"})
    assert r.json() == {"id": rid, "updated": True}
    stored = api.get("/v1/logs", params={"workload_id": workload_id}).json()["records"][0]
    assert stored["feedback"] == {"rating": 5, "comment": "great"}
    assert api.post("/v1/logs/nope/feedback", json={"rating": 1}).status_code == 404


def test_metrics_count_ingest_and_rejects(api, workload_id):
    api.post("/v1/logs", json={"records": [chat_record(workload_id, i) for i in range(3)]})
    api.post("/v1/logs", content=b"{not json")
    text = api.get("/metrics").text
    assert "flywheel_ingest_records_total" in text
    assert 'flywheel_ingest_rejects_total{reason="invalid_json"}' in text
    assert "flywheel_ingest_latency_seconds_bucket" in text


def test_blueprint_document_loads_unchanged(api, workload_id):
    """The NVIDIA blueprint's Elasticsearch document, extra keys and all, round-trips."""
    doc = orjson.loads(orjson.dumps(chat_record(workload_id, 7)))
    doc["request"]["temperature"] = 0.2
    doc["response"]["usage"] = {"prompt_tokens": 3, "completion_tokens": 4}
    api.post("/v1/logs", json=doc)
    stored = api.get("/v1/logs", params={"workload_id": workload_id}).json()["records"][0]
    assert stored["request"] == doc["request"] and stored["response"] == doc["response"]


def test_client_ids_that_look_like_pii_are_pseudonymized_stably(api, workload_id):
    card_like = "4111111111111111"  # a Luhn-valid card number used as an id
    rec = chat_record(workload_id, 1, id=card_like)
    first = api.post("/v1/logs", json=rec).json()
    again = api.post("/v1/logs", json=rec).json()
    assert first["ids"] == again["ids"] and again["duplicates"] == 1
    assert first["ids"][0].startswith("pid-") and card_like not in first["ids"][0]
    assert api.post(f"/v1/logs/{card_like}/feedback", json={"rating": 1}).json()["updated"] is True
    stored = api.get("/v1/logs", params={"workload_id": workload_id}).json()["records"][0]
    assert stored["feedback"] == {"rating": 1} and card_like not in str(stored)
