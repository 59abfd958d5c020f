"""The Serve app unchanged on Elasticsearch (logs) + MongoDB (jobs, keys, audit), and the
store going away mid-ingest: 503 with Retry-After, nothing acknowledged lost, ingest resumes.

Runs under `make test`, which starts the real servers; this module starts an Elasticsearch of
its own so it can kill it without hurting other tests.
"""
from __future__ import annotations

import uuid
from urllib.parse import urlparse

import httpx
import pytest

from ray_app.demo import wait_healthy
from tests.conftest import ADMIN_KEY, chat_record
from tests.servers import start_elasticsearch
from tests.store_support import server_uri
from tests.workloads import customer_service_records


@pytest.fixture(scope="module")
def backend_app(ray_session, app_url, settings, tmp_path_factory):
    mongo = server_uri("mongodb")  # skips, saying why, outside `make test`
    es = start_elasticsearch(tmp_path_factory.mktemp("es-api"))
    from serve.launch import deploy

    backed = settings.with_overrides({"log_store": f"{es.uri}/api-logs",
                                      "job_store": f"{mongo.rsplit('/', 1)[0]}/fw_api_{uuid.uuid4().hex[:8]}"})
    url = deploy(backed, port=urlparse(app_url).port, name="flywheel-backends", route_prefix="/backends")
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    wait_healthy(url, timeout=60)
    servers = {"es": es, "settings": backed}  # a test that restarts Elasticsearch puts the new one here
    yield client, servers
    client.close()
    from ray import serve

    serve.delete("flywheel-backends")
    servers["es"].stop()



def test_api_works_unchanged_on_es_and_mongo(backend_app, workload_id):
    api, _ = backend_app
    recs = [chat_record(workload_id, i) for i in range(300)]
    assert api.post("/v1/logs", json={"records": recs}).json()["accepted"] == 300
    assert api.post("/v1/logs", json={"records": recs[:50]}).json()["duplicates"] == 50
    counts = {w["workload_id"]: w["count"] for w in api.get("/v1/workloads").json()}
    assert counts[workload_id] == 300
    records = api.get("/v1/logs", params={"workload_id": workload_id, "limit": 1000}).json()["records"]
    assert len(records) == 300 and records[0]["timestamp"] > records[-1]["timestamp"]

    job = api.post("/v1/jobs", json={"workload_id": workload_id, "client_id": "acme"}).json()
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "pending"
    assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    verdict = api.post("/v1/validate", json={"content": "Sure: to make a pipe bomb you need a pipe."}).json()
    assert verdict["allow"] is False
    assert api.get("/v1/audit/verify").json()["ok"] is True


def test_store_outage_mid_ingest_answers_503_then_resumes(backend_app, workload_id):
    api, servers = backend_app
    es = servers["es"]
    acknowledged = []
    for b in range(3):
        r = api.post("/v1/logs", json={"records": [chat_record(workload_id, b * 100 + i) for i in range(100)]})
        assert r.status_code == 200
        acknowledged += r.json()["ids"]

    es.stop()
    r = api.post("/v1/logs", json={"records": [chat_record(workload_id, 300 + i) for i in range(100)]})
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "store_unavailable" and int(r.headers["Retry-After"]) >= 1

    servers["es"] = start_elasticsearch(es.data_dir, es.port)
    for b in range(3, 6):  # the refused batch is resent, as a client honouring Retry-After would
        r = api.post("/v1/logs", json={"records": [chat_record(workload_id, b * 100 + i) for i in range(100)]})
        assert r.status_code == 200, r.text
    stored = api.get("/v1/logs", params={"workload_id": workload_id, "limit": 1000}).json()["records"]
    assert set(acknowledged) <= {r["id"] for r in stored}
    assert len(stored) == 600


def test_a_flywheel_job_runs_end_to_end_on_es_and_mongo(backend_app, tiny_model, tmp_path):
    """Records in through the ES-backed API, the job's stages and results in MongoDB, the audit there too."""
    from ray_app.governance.audit import verify
    from ray_app.storage import open_audit_store, open_job_store
    from train.flywheel_job import run_job

    api, servers = backend_app
    workload = f"es-job-{tmp_path.name[-8:]}"
    records = customer_service_records(40, seed=8, workload_id=workload)
    assert api.post("/v1/logs", json={"records": records}).status_code == 200
    settings = servers["settings"].with_overrides({
        "data_dir": str(tmp_path), "candidates": [{"model": tiny_model}],
        "data_split": {"eval_size": 8, "val_ratio": 0.1, "min_total_records": 20, "random_seed": 1},
        "icl_config": {"example_selection": "uniform_distribution", "max_examples": 2},
        "training": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "checkpoint_every": 2}})
    report = run_job(settings, workload_id=workload, client_id="acme", out_dir=tmp_path / "out")
    assert report["num_records"] == 40 and report["candidates"][0]["status"] == "completed"
    job = open_job_store(settings).get_job(report["job_id"])  # MongoDB
    assert job["status"] == "completed" and {s["status"] for s in job["stages"]} == {"completed"}
    assert api.get(f"/v1/jobs/{report['job_id']}").json()["status"] == "completed"  # the API reads the same
    assert verify(open_audit_store(settings)).ok
