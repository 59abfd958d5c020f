"""One contract, every backend: the same tests run against SQLite, Elasticsearch and MongoDB.

Log tests run over sqlite + elasticsearch, job and audit tests over sqlite + mongodb; the
backend is in each test id (`test_query_newest_first[elasticsearch]`). Servers are real
(started by tests/servers.py under `make test`); without them only sqlite runs and the
server backends skip, saying why. Concurrency tests use separate processes (spawned), as
Serve replicas and job drivers do.
"""
from __future__ import annotations

import random
import re
import time

import orjson
import pytest

from ray_app.errors import Conflict, NotFound, RecordsRejected, StoreUnavailable
from ray_app.schemas import Job, Stage
from ray_app.storage.base import GENESIS_HASH, entry_hash
from tests.servers import free_port
from tests.store_support import chat_record, drop, fresh_uri, in_processes, open_store

WORKERS = 4


def _store_fixture(kind: str):
    def fixture(request, tmp_path):
        uri = fresh_uri(request.param, tmp_path, kind)
        store = open_store(kind, uri)
        store.test_uri = uri  # what worker processes open
        yield store
        store.close()
        drop(uri)
    backends = ["sqlite", "elasticsearch" if kind == "log" else "mongodb"]
    return pytest.fixture(params=backends, name=f"{kind}_store")(fixture)


log_fixture = _store_fixture("log")
job_fixture = _store_fixture("job")
audit_fixture = _store_fixture("audit")


# -- LogStore ------------------------------------------------------------------------------


def test_put_many_is_idempotent_by_id(log_store):
    records = [chat_record(i) for i in range(5)]
    assert log_store.put_many(records) == 5
    assert log_store.put_many(records) == 0
    assert log_store.put_many(records[:3] + [chat_record(5), chat_record(6), chat_record(6)]) == 2
    assert log_store.count("w1", "c1") == 7
    assert log_store.get(records[2]["id"]) == records[2]  # kept whole: request, response, metrics
    assert log_store.get("no-such-id") is None


def test_put_many_reports_refused_records_and_keeps_the_rest(log_store):
    good = [chat_record(1), chat_record(2)]
    bad_ts = {**chat_record(3), "timestamp": "yesterday"}
    bad_workload = {**chat_record(4), "workload_id": {"name": "w1"}}
    no_client = {k: v for k, v in chat_record(5).items() if k != "client_id"}
    with pytest.raises(RecordsRejected) as caught:
        log_store.put_many([good[0], bad_ts, bad_workload, no_client, good[1]])
    assert caught.value.accepted == 2
    assert {r["id"] for r in caught.value.rejected} == {bad_ts["id"], bad_workload["id"], no_client["id"]}
    assert all(r["reason"] for r in caught.value.rejected)
    assert [r["id"] for r in log_store.export("w1", "c1")] == [g["id"] for g in good]
    assert log_store.get(bad_ts["id"]) is None


def test_query_newest_first_with_filters_and_limit(log_store):
    stamps = random.Random(7).sample(range(60), 30)  # inserted out of time order
    records = [chat_record(i, workload_id=f"w{i % 2}", client_id=f"c{i % 3}", ts=stamps[i]) for i in range(30)]
    log_store.put_many(records)
    newest_first = sorted(records, key=lambda r: r["timestamp"], reverse=True)
    assert [r["id"] for r in log_store.query(limit=100)] == [r["id"] for r in newest_first]
    assert log_store.query(limit=3) == newest_first[:3]
    only_w1 = [r["id"] for r in newest_first if r["workload_id"] == "w1"]
    assert [r["id"] for r in log_store.query(workload_id="w1")] == only_w1
    both = [r["id"] for r in newest_first if r["workload_id"] == "w0" and r["client_id"] == "c2"]
    assert [r["id"] for r in log_store.query(workload_id="w0", client_id="c2", limit=2)] == both[:2]
    assert [r["id"] for r in log_store.query(client_id="c1")] == [r["id"] for r in newest_first
                                                                    if r["client_id"] == "c1"]
    assert log_store.query(workload_id="nobody") == []


def test_export_is_oldest_first_and_complete_across_pages(log_store):
    stamps = random.Random(3).sample(range(100), 25)
    mine = [chat_record(i, ts=stamps[i]) for i in range(25)]
    other = [chat_record(i, client_id="c2") for i in range(5)]
    log_store.put_many(mine + other)
    oldest_first = [r["id"] for r in sorted(mine, key=lambda r: r["timestamp"])]
    assert [r["id"] for r in log_store.export("w1", "c1", batch_size=4)] == oldest_first
    assert [r["id"] for r in log_store.export("w1", "c1", batch_size=4, limit=10)] == oldest_first[:10]
    assert list(log_store.export("w1", "nobody")) == []


def test_export_and_query_go_past_ten_thousand_hits(log_store):
    n = 12_000
    records = [{"id": f"r{i:05d}", "timestamp": 1_700_000_000.0 + i / 8, "workload_id": "big",
                "client_id": "c", "request": {"messages": [{"role": "user", "content": "x"}]},
                "response": {"choices": []}} for i in range(n)]
    assert log_store.put_many(records) == n
    exported = [r["id"] for r in log_store.export("big", "c")]
    assert exported == [r["id"] for r in records]
    newest = log_store.query(workload_id="big", limit=10_500)
    assert [r["id"] for r in newest] == [r["id"] for r in reversed(records)][:10_500]


def test_workloads_counts_and_count(log_store):
    for w, c, n in [("w2", "c1", 3), ("w1", "c2", 2), ("w1", "c1", 4)]:
        log_store.put_many([chat_record(i, workload_id=w, client_id=c) for i in range(n)])
    assert log_store.workloads() == [
        {"workload_id": "w1", "client_id": "c1", "count": 4},
        {"workload_id": "w1", "client_id": "c2", "count": 2},
        {"workload_id": "w2", "client_id": "c1", "count": 3},
    ]
    assert log_store.count("w1", "c2") == 2
    assert log_store.count("w9", "c1") == 0


def test_set_feedback_merges_into_the_stored_record(log_store):
    record = chat_record(1)
    log_store.put_many([record])
    assert log_store.set_feedback(record["id"], {"rating": 5}) is True
    assert log_store.set_feedback(record["id"], {"comment": "right tool"}) is True
    stored = log_store.get(record["id"])
    assert stored["feedback"] == {"rating": 5, "comment": "right tool"}
    assert {k: v for k, v in stored.items() if k != "feedback"} == record
    assert log_store.query(workload_id="w1")[0]["feedback"]["rating"] == 5
    assert log_store.set_feedback("no-such-id", {"rating": 1}) is False


def test_ping_answers_when_up(log_store):
    log_store.ping()


def _with_tools(i: int, tools: list) -> dict:
    record = chat_record(i)
    return {**record, "request": {**record["request"], "tools": tools}}


LONG_TOOLS = [{"type": "function", "function": {"name": f"tool_{k}", "description": f"Does thing {k}. " * 8,
                                                "parameters": {"type": "object", "properties": {"b": {}, "a": {}}}}}
              for k in range(4)]


def test_records_sharing_a_tool_list_read_back_whole_and_apart(log_store):
    records = [_with_tools(i, LONG_TOOLS) for i in range(3)] + [chat_record(3)]  # the last: a one-tool list
    assert log_store.put_many(records) == 4
    exported = list(log_store.export("w1", "c1"))
    assert exported == records and log_store.query(workload_id="w1") == records[::-1]
    exported[0]["request"]["tools"].pop()  # each record read back has a list of its own
    assert log_store.get(records[1]["id"]) == records[1] and len(exported[1]["request"]["tools"]) == 4
    assert log_store.set_feedback(records[2]["id"], {"rating": 3})
    assert log_store.get(records[2]["id"]) == {**records[2], "feedback": {"rating": 3}}


def test_sqlite_keeps_each_tool_list_once_and_reads_files_from_before(tmp_path):
    import sqlite3

    from ray_app.storage.sqlite import SQLiteLogStore

    path = tmp_path / "logs.db"
    old = sqlite3.connect(path)  # the layout before tool lists were shared
    old.executescript("CREATE TABLE logs (id TEXT PRIMARY KEY, workload_id TEXT NOT NULL, client_id TEXT NOT NULL, "
                      "ts REAL NOT NULL, body BLOB NOT NULL)")
    before = _with_tools(0, LONG_TOOLS)
    old.execute("INSERT INTO logs VALUES (?, ?, ?, ?, ?)", (before["id"], "w1", "c1", before["timestamp"],
                                                          orjson.dumps(before)))
    old.commit()
    old.close()
    store = SQLiteLogStore(path)
    other = [_with_tools(i, LONG_TOOLS) for i in range(1, 40)] + [_with_tools(40, LONG_TOOLS[:3])]
    assert store.put_many(other[:20]) == 20 and store.put_many(other[20:]) == 20
    exported = list(store.export("w1", "c1"))
    assert exported == [before, *other]
    assert list(exported[1]["request"]["tools"][0]["function"]["parameters"]["properties"]) == ["b", "a"]  # as sent
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM tool_lists").fetchone()[0] == 2
    assert conn.execute("SELECT COUNT(*) FROM logs WHERE tools_key IS NULL").fetchone()[0] == 1  # the old row
    row = conn.execute("SELECT body FROM logs WHERE id = ?", (other[0]["id"],)).fetchone()[0]
    assert row == orjson.dumps({**other[0], "request": {**other[0]["request"], "tools": None}})  # 44% of the bytes
    store.close()


# -- JobStore ------------------------------------------------------------------------------


def _job(workload_id="w1", client_id="c1", **fields) -> dict:
    return Job(workload_id=workload_id, client_id=client_id, stages=[Stage(name="train")],
               **fields).model_dump(mode="json")


def test_get_job_round_trip_and_not_found(job_store):
    job = _job(config={"candidates": [{"model": "smollm2-135m"}]})
    assert job_store.create_job(job) == job
    assert job_store.get_job(job["id"]) == job
    with pytest.raises(NotFound, match="nope"):
        job_store.get_job("nope")


def test_list_jobs_newest_first_with_filters(job_store):
    jobs = [_job(workload_id=f"w{i % 2}", client_id=f"c{i % 3}", status="completed" if i % 4 == 0 else "pending",
                 created_at=1_700_000_000.0 + t) for i, t in enumerate(random.Random(5).sample(range(50), 12))]
    for job in jobs:
        job_store.create_job(job)
    newest = sorted(jobs, key=lambda j: j["created_at"], reverse=True)
    ids = lambda rows: [r["id"] for r in rows]  # noqa: E731
    assert ids(job_store.list_jobs()) == ids(newest)
    assert ids(job_store.list_jobs(limit=5)) == ids(newest)[:5]
    assert ids(job_store.list_jobs(workload_id="w1")) == ids(j for j in newest if j["workload_id"] == "w1")
    assert ids(job_store.list_jobs(workload_id="w0", client_id="c0")) == ids(
        j for j in newest if (j["workload_id"], j["client_id"]) == ("w0", "c0"))
    assert ids(job_store.list_jobs(status="completed")) == ids(j for j in newest if j["status"] == "completed")
    assert job_store.list_jobs(limit=0) == []


def test_update_job_applies_mutation_and_aborts_on_conflict(job_store):
    job = job_store.create_job(_job())

    def start(j):
        j["status"] = "running"
        j["stages"][0]["status"] = "running"

    updated = job_store.update_job(job["id"], start)
    assert updated["status"] == "running" and updated["updated_at"] >= job["updated_at"]
    assert job_store.get_job(job["id"]) == updated
    assert job_store.list_jobs(status="running")[0]["id"] == job["id"]

    def refuse(j):
        j["status"] = "failed"
        raise Conflict("stage already claimed")

    with pytest.raises(Conflict):
        job_store.update_job(job["id"], refuse)
    assert job_store.get_job(job["id"]) == updated
    with pytest.raises(NotFound):
        job_store.update_job("nope", start)


def _increment_job(barrier, uri: str, job_id: str, times: int) -> None:
    store = open_store("job", uri)
    barrier.wait()

    def bump(job):
        job["config"]["counter"] = job["config"].get("counter", 0) + 1
        time.sleep(0.002)  # widen the read-modify-write window: lost updates would show

    for _ in range(times):
        store.update_job(job_id, bump)
    store.close()


def test_update_job_loses_no_update_between_processes(job_store):
    job = job_store.create_job(_job())
    in_processes(_increment_job, [(job_store.test_uri, job["id"], 25)] * WORKERS)
    assert job_store.get_job(job["id"])["config"]["counter"] == WORKERS * 25


def _claim_stage(barrier, uri: str, job_id: str, driver: str) -> bool:
    store = open_store("job", uri)
    store.get_job(job_id)  # connected and warm, so the claims start together
    barrier.wait()

    def claim(job):
        stage = job["stages"][0]
        if stage["status"] != "pending":
            raise Conflict(f"stage {stage['name']} already claimed")
        stage["status"], stage["result"] = "running", {"driver": driver}
        time.sleep(0.01)

    try:
        store.update_job(job_id, claim)
        return True
    except Conflict:
        return False
    finally:
        store.close()


def test_a_stage_is_claimed_by_exactly_one_driver(job_store):
    job = job_store.create_job(_job())
    won = in_processes(_claim_stage, [(job_store.test_uri, job["id"], f"d{i}") for i in range(WORKERS)])
    assert sorted(won) == [False] * (WORKERS - 1) + [True]
    winner = job_store.get_job(job["id"])["stages"][0]["result"]["driver"]
    assert won[int(winner[1:])] is True


def test_delete_job(job_store):
    keep, gone = job_store.create_job(_job()), job_store.create_job(_job())
    job_store.delete_job(gone["id"])
    with pytest.raises(NotFound):
        job_store.get_job(gone["id"])
    with pytest.raises(NotFound):
        job_store.delete_job(gone["id"])
    assert [j["id"] for j in job_store.list_jobs()] == [keep["id"]]


def test_api_keys(job_store):
    assert job_store.get_api_key("h1") is None
    job_store.put_api_key("h1", "admin", "bootstrap")
    job_store.put_api_key("h2", "ingest", "svc-a")
    assert job_store.get_api_key("h1") == {"role": "admin", "name": "bootstrap"}
    job_store.put_api_key("h1", "reader", "demoted")
    assert job_store.get_api_key("h1") == {"role": "reader", "name": "demoted"}
    assert job_store.get_api_key("h2") == {"role": "ingest", "name": "svc-a"}


def _spend_budget(barrier, uri: str, times: int) -> None:
    store = open_store("job", uri)
    barrier.wait()
    for _ in range(times):
        store.update_doc("privacy", "w1/c1", lambda d: d.update(epsilon=round(d.get("epsilon", 0.0) + 0.5, 6)))
    store.close()


def test_docs_create_update_and_concurrent_updates(job_store):
    assert job_store.get_doc("privacy", "w1/c1") is None
    assert job_store.update_doc("privacy", "w1/c1", lambda d: d.update(epsilon=0.0, runs=[])) == {
        "epsilon": 0.0, "runs": []}
    job_store.update_doc("privacy", "w1/c1", lambda d: d["runs"].append("job-1"))
    assert job_store.get_doc("privacy", "w1/c1") == {"epsilon": 0.0, "runs": ["job-1"]}
    assert job_store.get_doc("triggers", "w1/c1") is None  # same id, other collection
    job_store.update_doc("privacy", "w0/c1", lambda d: d.update(epsilon=1.0))
    job_store.update_doc("triggers", "w2/c1", lambda d: d.update(n=1))
    assert job_store.list_docs("privacy") == [("w0/c1", {"epsilon": 1.0}),
                                              ("w1/c1", {"epsilon": 0.0, "runs": ["job-1"]})]
    assert job_store.list_docs("models") == []
    in_processes(_spend_budget, [(job_store.test_uri, 10)] * WORKERS)
    assert job_store.get_doc("privacy", "w1/c1")["epsilon"] == WORKERS * 10 * 0.5


# -- AuditStore ----------------------------------------------------------------------------


def _assert_chain(entries: list[dict], n: int) -> None:
    assert [e["seq"] for e in entries] == list(range(n))
    for prev, entry in zip([None, *entries], entries, strict=False):
        assert entry["prev_hash"] == (GENESIS_HASH if prev is None else prev["hash"])
        assert entry["hash"] == entry_hash(entry)


def test_audit_append_chains_entries(audit_store):
    stored = [audit_store.append({"action": "ingest", "n": i, "actor": {"role": "ingest"}}) for i in range(5)]
    entries = list(audit_store.entries())
    assert entries == stored
    _assert_chain(entries, 5)
    assert [e["event"]["n"] for e in audit_store.entries(start_seq=2, limit=2)] == [2, 3]
    assert list(audit_store.entries(start_seq=9)) == []


def _append_audit(barrier, uri: str, writer: int, times: int) -> None:
    store = open_store("audit", uri)
    barrier.wait()
    for i in range(times):
        store.append({"action": "job.update", "writer": writer, "i": i, "score": 0.1 * i})
    store.close()


def test_audit_chain_stays_contiguous_under_concurrent_writers(audit_store):
    in_processes(_append_audit, [(audit_store.test_uri, w, 15) for w in range(WORKERS)])
    entries = list(audit_store.entries())
    _assert_chain(entries, WORKERS * 15)
    assert sorted((e["event"]["writer"], e["event"]["i"]) for e in entries) == [
        (w, i) for w in range(WORKERS) for i in range(15)]


# -- a store that is down at start ----------------------------------------------------------


def _dead_uris(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    port = free_port()  # nothing listens here
    return [
        ("log", f"sqlite:///{blocker}/logs.db", {}),
        ("job", f"sqlite:///{blocker}/jobs.db", {}),
        ("log", f"elasticsearch://127.0.0.1:{port}", {"max_retries": 1, "backoff": 0.01}),
        ("job", f"mongodb://127.0.0.1:{port}/flywheel", {"server_selection_timeout": 0.3}),
        ("audit", f"mongodb://127.0.0.1:{port}/flywheel", {"server_selection_timeout": 0.3}),
    ]


@pytest.mark.parametrize("case", range(5), ids=["sqlite-log", "sqlite-job", "elasticsearch", "mongodb-job",
                                                "mongodb-audit"])
def test_store_down_at_start_raises_store_unavailable_naming_the_uri(case, tmp_path):
    kind, uri, options = _dead_uris(tmp_path)[case]
    with pytest.raises(StoreUnavailable, match=re.escape(uri)):
        open_store(kind, uri, **options).ping()
    if not uri.startswith("sqlite"):  # constructed lazily: the first real call says the same
        store = open_store(kind, uri, **options)
        call = {"log": lambda: store.put_many([chat_record(1)]), "job": lambda: store.get_job("j"),
                "audit": lambda: store.append({"action": "x"})}[kind]
        with pytest.raises(StoreUnavailable, match=re.escape(uri)):
            call()
