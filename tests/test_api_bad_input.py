"""Bad input gets a 4xx naming the field or reason, never a 5xx, and nothing half-written."""
from __future__ import annotations

import httpx
import pytest

from tests.conftest import chat_record


def _count(api, workload_id) -> int:
    return {w["workload_id"]: w["count"] for w in api.get("/v1/workloads").json()}.get(workload_id, 0)


def test_malformed_json(api):
    r = api.post("/v1/logs", content=b'{"records": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_json"


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.update(workload_id=5), "workload_id"),
    (lambda r: r.pop("client_id"), "client_id"),
    (lambda r: r.pop("response"), "response"),
    (lambda r: r["request"].update(messages=[]), "request.messages"),
    (lambda r: r["request"].update(messages="hi"), "request.messages"),
    (lambda r: r["request"]["messages"][0].update(role="robot"), "request.messages.0.role"),
    (lambda r: r["response"].update(choices=[]), "response.choices"),
    (lambda r: r.update(timestamp="yesterday"), "timestamp"),
    (lambda r: r.update(workload_type="chit_chat"), "workload_type"),
])
def test_bad_single_record_names_the_field(api, workload_id, mutate, field):
    rec = chat_record(workload_id, 0)
    mutate(rec)
    r = api.post("/v1/logs", json=rec)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field
    assert _count(api, workload_id) == 0


def test_batch_with_one_bad_record_is_rejected_whole(api, workload_id):
    recs = [chat_record(workload_id, i) for i in range(10)]
    recs[7]["request"]["messages"] = []
    r = api.post("/v1/logs", json={"records": recs})
    assert r.status_code == 422
    assert r.json()["field"] == "records.7.request.messages"
    assert _count(api, workload_id) == 0  # nothing half-written


def test_empty_and_non_object_bodies(api):
    assert api.post("/v1/logs", json={"records": []}).status_code == 422
    assert api.post("/v1/logs", json=[1, 2]).json()["field"] == "(body)"
    assert api.post("/v1/logs", json={"records": "x"}).json()["field"] == "records"


def test_batch_over_the_limit(api, workload_id):
    recs = [chat_record(workload_id, i) for i in range(2001)]  # the test app's limit is 2,000
    r = api.post("/v1/logs", json={"records": recs})
    assert r.status_code == 422
    assert "over the limit" in r.json()["message"]


def test_oversized_body(api):
    body = b'{"records": [' + b" " * (5 * 1024 * 1024) + b"]}"  # the test app's limit is 4 MiB
    r = api.post("/v1/logs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"] == "payload_too_large"


def test_foreign_constitutional_hash_is_rejected(api, workload_id):
    r = api.post("/v1/logs", json=chat_record(workload_id, 0, constitutional_hash="deadbeef"))
    assert r.status_code == 422
    assert r.json()["field"] == "constitutional_hash"


def test_bad_query_parameter(api):
    r = api.get("/v1/logs", params={"limit": "many"})
    assert r.status_code == 422
    assert r.json()["field"] == "query.limit"


def test_unknown_route_is_json_404(api):
    r = api.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_no_key_and_unknown_key(app_url, workload_id):
    assert httpx.post(f"{app_url}/v1/logs", json=chat_record(workload_id, 0)).status_code == 401
    r = httpx.get(f"{app_url}/v1/workloads", headers={"Authorization": "Bearer not-a-key"})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
