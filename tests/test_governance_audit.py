"""Audit log routing/sampling/dedup, and chain verification against tampering in the SQLite file."""
from __future__ import annotations

import sqlite3

import orjson
import pytest

from ray_app.governance.audit import AuditLog, classify, verify
from ray_app.storage.sqlite import SQLiteAuditStore

HASH = "cdd01ef066bc6cf2"


@pytest.fixture
def store(tmp_path):
    s = SQLiteAuditStore(tmp_path / "audit.db")
    yield s
    s.close()


@pytest.mark.parametrize("event_type,payload,expected,priority", [
    ("validation", {"violations": ["harmful:violence"]}, "constitutional_violation", "critical"),
    ("job_stage", {"compliance_score": 0.5}, "model_optimization_trigger", "high"),
    ("human_feedback", {"rating": 1}, "human_feedback", "medium"),
    ("job_stage", {"source": "human_review"}, "human_feedback", "medium"),
    ("policy_decision", {"allow": True}, "policy_evaluation", "low"),
    ("ingest_batch", {"accepted": 3}, "audit_trail", "low"),
])
def test_classification_and_priority(store, event_type, payload, expected, priority):
    assert classify(event_type, payload) == expected
    entry = AuditLog(store, constitutional_hash=HASH, sample_rate=1.0).record(event_type, payload)
    assert entry["event"]["classification"] == expected and entry["event"]["priority"] == priority


def test_routine_successes_sampled_deterministically(tmp_path):
    kept = []
    for run in range(2):
        log = AuditLog(SQLiteAuditStore(tmp_path / f"a{run}.db"), constitutional_hash=HASH, sample_rate=0.1)
        kept.append([log.record("ingest_batch", {"batch": i}) is not None for i in range(2000)])
    assert kept[0] == kept[1]
    assert 120 <= sum(kept[0]) <= 280  # ~10%


def test_important_events_are_never_sampled_out(store):
    log = AuditLog(store, constitutional_hash=HASH, sample_rate=0.0)
    assert log.record("ingest_batch", {"batch": 1}) is None
    assert log.record("ingest_batch", {"batch": 1}, outcome="failure") is not None
    assert log.record("policy_decision", {"rule": "promotion", "allow": False}, outcome="denied") is not None
    for event_type in ("job_stage", "training", "promotion"):
        assert log.record(event_type, {"job": "j"}) is not None


def test_duplicates_dropped_and_payload_scrubbed(store):
    log = AuditLog(store, constitutional_hash=HASH, sample_rate=1.0)
    first = log.record("validation", {"content_from": "jane@example.org", "violations": ["pii_leak:email"]})
    assert first["event"]["payload"]["content_from"] == "<EMAIL>"
    assert log.record("validation", {"content_from": "jane@example.org", "violations": ["pii_leak:email"]}) is None
    assert log.record("validation", {"content_from": "bob@example.org", "violations": ["pii_leak:email"]})


def _chain(store, n=4):
    log = AuditLog(store, constitutional_hash=HASH, sample_rate=1.0)
    for i in range(n):
        log.record("job_stage", {"job": "j1", "stage": f"s{i}", "score": i / 10})
    return log


def _rows(store):
    with sqlite3.connect(store.path) as db:
        return db.execute("SELECT seq, doc FROM audit ORDER BY seq").fetchall()


def _write(store, seq, doc):
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE audit SET doc = ? WHERE seq = ?", (doc, seq))


def test_intact_chain_verifies(store):
    _chain(store)
    assert verify(store).ok and verify(store).entries == 4


def test_any_flipped_byte_is_caught_and_named(store):
    _chain(store, n=3)
    for seq, doc in _rows(store):
        for i in range(len(doc)):
            tampered = bytearray(doc)
            tampered[i] ^= 0x01
            _write(store, seq, bytes(tampered))
            result = verify(store)
            assert not result.ok and result.first_bad_seq == seq, (seq, i, bytes(tampered[max(0, i - 10):i + 10]))
        _write(store, seq, doc)
    assert verify(store).ok


@pytest.mark.parametrize("field,edit", [
    ("seq", lambda e: {**e, "seq": e["seq"] + 1}),
    ("prev_hash", lambda e: {**e, "prev_hash": _other_hex(e["prev_hash"])}),
    ("event", lambda e: {**e, "event": {**e["event"], "payload": {**e["event"]["payload"], "score": 0.99}}}),
    ("hash", lambda e: {**e, "hash": _other_hex(e["hash"])}),
    ("rehashed event", lambda e: _rehash({**e, "event": {**e["event"], "outcome": "failure"}})),
])
def test_each_field_edit_is_caught(store, field, edit):
    _chain(store)
    seq, doc = _rows(store)[1]
    _write(store, seq, orjson.dumps(edit(orjson.loads(doc))))
    result = verify(store)
    assert not result.ok and result.first_bad_seq in (1, 2) and result.reason


def _other_hex(digest):
    return ("1" if digest[0] == "0" else "0") + digest[1:]


def _rehash(entry):
    from ray_app.storage.base import entry_hash
    return {**entry, "hash": entry_hash(entry)}


def test_deleting_or_reordering_is_caught(store):
    log = _chain(store, n=5)
    anchor = log.head()
    rows = _rows(store)
    with sqlite3.connect(store.path) as db:  # swap two documents
        db.execute("UPDATE audit SET doc = ? WHERE seq = 1", (rows[2][1],))
        db.execute("UPDATE audit SET doc = ? WHERE seq = 2", (rows[1][1],))
    assert verify(store).first_bad_seq == 1
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE audit SET doc = ? WHERE seq = 1", (rows[1][1],))
        db.execute("UPDATE audit SET doc = ? WHERE seq = 2", (rows[2][1],))
        db.execute("DELETE FROM audit WHERE seq = 3")  # from the middle
    assert verify(store).first_bad_seq == 3
    with sqlite3.connect(store.path) as db:
        db.execute("DELETE FROM audit WHERE seq >= 3")  # cut off the end: only an anchor shows it
    assert verify(store).ok
    result = verify(store, anchor=anchor)
    assert not result.ok and result.first_bad_seq == 3
