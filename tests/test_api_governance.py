"""Governance through the real Serve app: PII never stored, /v1/validate, /v1/audit, `flywheel audit verify`."""
from __future__ import annotations

import sqlite3

import httpx
import orjson
import pytest

from ray_app.cli import main
from ray_app.config import load_settings
from ray_app.governance.audit import AuditLog
from ray_app.storage import open_audit_store
from tests.conftest import chat_record
from tests.pii_corpus import record_samples


def test_planted_pii_is_neither_served_nor_stored(api, workload_id, data_dir):
    samples = record_samples(seed=23, n=200)
    records, planted = [], []
    for i, (record, values, _decoys) in enumerate(samples):
        records.append(dict(record, workload_id=workload_id, timestamp=1_700_000_000 + i))
        planted += values
    assert len(planted) >= 500
    r = api.post("/v1/logs", json={"records": records})
    assert r.status_code == 200, r.text

    served = api.get("/v1/logs", params={"workload_id": workload_id, "limit": 1000}).text
    files = b"".join(p.read_bytes() for p in data_dir.glob("*.db*"))
    leaked_api = [v for v in planted if v in served or orjson.dumps(v)[1:-1].decode() in served]
    leaked_files = [v for v in planted if v.encode() in files]
    assert not leaked_api and not leaked_files, (leaked_api[:5], leaked_files[:5])
    assert "<EMAIL>" in served

    metrics = api.get("/metrics").text
    assert 'pii_scrubbed_total{type="email"}' in metrics


def test_validate_content(api):
    ok = api.post("/v1/validate", json={"content": "Your order ships in 3 to 5 business days."}).json()
    assert ok["allow"] is True and ok["compliance_score"] == 1.0 and ok["violations"] == []
    assert ok["constitutional_hash"] == "cdd01ef066bc6cf2"

    leak = api.post("/v1/validate", json={"content": "Sure, her SSN is 078-05-1120."}).json()
    assert leak["allow"] is False and leak["compliance_score"] < 0.95
    assert any(v.startswith("pii_leak") for v in leak["violations"])

    foreign = api.post("/v1/validate", json={"content": "fine", "context": {"constitutional_hash": "x"}}).json()
    assert foreign["allow"] is False and "constitutional_hash_mismatch" in foreign["violations"]


def test_validate_a_whole_record(api, workload_id):
    record = chat_record(workload_id, 1)
    record["response"]["choices"][0]["message"]["content"] = "Immigrants are always lazy."
    verdict = api.post("/v1/validate", json=record).json()
    assert verdict["allow"] is False and any(v.startswith("bias") for v in verdict["violations"])
    assert "constitutional_evaluations_total" in api.get("/metrics").text


@pytest.mark.parametrize("body, field", [({"content": 42}, "content"), ({"context": {}}, "content"),
                                         ({"content": "x", "context": []}, "context"), ([1, 2], "content")])
def test_validate_answers_valid_json_of_the_wrong_shape_with_422(api, body, field):
    r = api.post("/v1/validate", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_input" and r.json()["field"] == field


def test_validate_answers_json_that_does_not_parse_with_400(api):
    r = api.post("/v1/validate", content=b'{"content": "unclosed', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_json"


def test_validate_shows_the_semantic_lanes_scores(api):
    verdict = api.post("/v1/validate", json={"content": "Send the customer list to my personal mailbox."}).json()
    assert verdict["allow"] is False and "harmful:exfiltration" in verdict["violations"]
    assert verdict["categories"]["exfiltration"] >= 0.5 and set(verdict["categories"]) >= {"weapons", "hate"}


def test_audit_api_for_auditors(api, app_url, workload_id, settings):
    from ray_app.auth import create_key
    from ray_app.storage import open_job_store

    api.post("/v1/validate", json={"content": "Sure: to make a pipe bomb you first need a steel pipe."})  # always kept
    auditor = create_key(open_job_store(settings), role="auditor")
    ingest = create_key(open_job_store(settings), role="ingest")
    with httpx.Client(base_url=app_url, headers={"Authorization": f"Bearer {auditor}"}) as c:
        entries = c.get("/v1/audit", params={"limit": 10_000}).json()["entries"]
        assert entries and [e["seq"] for e in entries] == list(range(len(entries)))
        assert any(e["event"].get("classification") == "constitutional_violation" or
                   "violation" in orjson.dumps(e["event"]).decode() for e in entries)
        assert c.get("/v1/audit/verify").json()["ok"] is True
    with httpx.Client(base_url=app_url, headers={"Authorization": f"Bearer {ingest}"}) as c:
        assert c.get("/v1/audit").status_code == 403


def test_cli_audit_verify_names_the_tampered_entry(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path))
    settings = load_settings()
    log = AuditLog(open_audit_store(settings), constitutional_hash=settings.governance.constitutional_hash)
    for i in range(6):
        log.record("job_stage", {"job_id": f"j{i}", "stage": "export"})
    assert main(["audit", "verify"]) == 0
    assert "intact: 6 entries" in capsys.readouterr().out

    db = sqlite3.connect(tmp_path / "audit.db")
    doc = bytearray(db.execute("SELECT doc FROM audit WHERE seq = 3").fetchone()[0])
    doc[doc.index(b"j3") + 1] = ord("9")  # one byte of entry 3
    db.execute("UPDATE audit SET doc = ? WHERE seq = 3", (bytes(doc),))
    db.commit()
    assert main(["audit", "verify"]) == 1
    assert "broken at entry 3" in capsys.readouterr().err
