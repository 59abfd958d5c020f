"""Jobs API and role-based auth through the real Serve app and the `flywheel keys` CLI."""
from __future__ import annotations

import httpx
import pytest

from ray_app.cli import main
from tests.conftest import chat_record


@pytest.fixture(scope="module")
def keys(data_dir, app_url):
    """One key per role, created through the CLI as an operator would."""
    import io
    from contextlib import redirect_stdout

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_DATA_DIR", str(data_dir))  # the CLI reads settings at its entry point
        for role in ("ingest", "operator", "auditor"):
            buf = io.StringIO()
            with redirect_stdout(buf):
                assert main(["keys", "create", "--role", role]) == 0
            out[role] = buf.getvalue().strip()
    return out


def _as(app_url, key):
    return httpx.Client(base_url=app_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_keys_are_hashed_at_rest(keys, data_dir):
    raw = (data_dir / "jobs.db").read_bytes() + (data_dir / "jobs.db-wal").read_bytes()
    assert all(key.startswith("fw_") for key in keys.values())
    assert not any(key.encode() in raw for key in keys.values())


@pytest.mark.parametrize("role, method, path, allowed", [
    ("ingest", "post", "/v1/logs", True),
    ("ingest", "get", "/v1/jobs", False),
    ("ingest", "get", "/v1/logs", False),
    ("operator", "get", "/v1/jobs", True),
    ("operator", "post", "/v1/logs", False),
    ("auditor", "get", "/v1/logs", True),
    ("auditor", "post", "/v1/jobs", False),
])
def test_roles(keys, app_url, workload_id, role, method, path, allowed):
    body = chat_record(workload_id, 0) if path == "/v1/logs" else {"workload_id": workload_id, "client_id": "c"}
    with _as(app_url, keys[role]) as c:
        r = c.request(method.upper(), path, json=body if method == "post" else None)
    if allowed:
        assert r.status_code in (200, 201), r.text
    else:
        assert r.status_code == 403
        assert r.json()["role"] == role


def test_job_lifecycle(api, workload_id):
    r = api.post("/v1/jobs", json={"workload_id": workload_id, "client_id": "acme"})
    assert r.status_code == 201
    job_id = r.json()["id"]
    assert r.json()["status"] == "pending"

    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["workload_id"] == workload_id and job["constitutional_hash"] == "cdd01ef066bc6cf2"
    assert job_id in [j["id"] for j in api.get("/v1/jobs", params={"workload_id": workload_id}).json()["jobs"]]

    assert api.post(f"/v1/jobs/{job_id}/cancel").json() == {"id": job_id, "status": "cancelled"}
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 409  # already finished
    assert api.delete(f"/v1/jobs/{job_id}").json() == {"id": job_id, "status": "deleted"}
    assert api.get(f"/v1/jobs/{job_id}").status_code == 404


def test_job_config_is_validated(api, workload_id):
    r = api.post("/v1/jobs", json={"workload_id": workload_id, "client_id": "c",
                                   "config": {"training": {"epochs": 1, "epocs": 2}}})
    assert r.status_code == 422
    assert "training.epocs: unknown key" in r.json()["message"]
    r = api.post("/v1/jobs", json={"workload_id": workload_id, "client_id": "c",
                                   "config": {"data_split": {"val_ratio": 2}}})
    assert r.status_code == 422 and "data_split.val_ratio" in r.json()["message"]


@pytest.mark.parametrize("body, field", [
    ({"client_id": "c"}, "workload_id"),
    ({"workload_id": "w", "client_id": "c", "extra": 1}, "extra"),
    ({"workload_id": "", "client_id": "c"}, "workload_id"),
])
def test_bad_job_bodies(api, body, field):
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 422 and r.json()["field"] == field


def test_unknown_job_ids(api):
    for method, path in [("GET", "/v1/jobs/nope"), ("POST", "/v1/jobs/nope/cancel"), ("DELETE", "/v1/jobs/nope")]:
        r = api.request(method, path)
        assert r.status_code == 404 and r.json()["error"] == "not_found"
