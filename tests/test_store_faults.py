"""The stores when the server goes away mid-ingest, and when it refuses single documents.

Each outage test starts a server of its own (killing the shared one would break the other
tests), takes it down while writing, checks the store says StoreUnavailable within a small
retry budget, brings the server back on the same port and data dir, and checks that writes
resume and that everything acknowledged before the outage is still there.

MongoDB (SecantusDB with --sync-on-commit, like mongod's journal) gets a real crash: SIGKILL
while a writer thread appends. The Elasticsearch stand-in (noida-db) keeps documents in memory
and writes them to disk about a second after they change, so a SIGKILL loses its last second
of acknowledged writes - a property of the emulator, not of Elasticsearch, which fsyncs its
translog before acknowledging. It is therefore stopped with SIGTERM mid-ingest: the port goes
dead the same way, and the check that acknowledged records survive stays meaningful.
"""
from __future__ import annotations

import threading
import time

import pytest
from elasticsearch import Elasticsearch

from ray_app.errors import RecordsRejected, StoreUnavailable
from ray_app.storage.base import entry_hash
from tests.servers import start_elasticsearch, start_mongodb
from tests.store_support import chat_record, drop, open_store, server_uri

RETRY_BUDGET_S = 10.0  # a generous ceiling for "bounded": the stores below give up within ~1-2 s


def test_elasticsearch_outage_mid_ingest_then_resume(tmp_path):
    server_uri("elasticsearch")  # skips, saying why, outside `make test`
    server = start_elasticsearch(tmp_path / "es")
    store = open_store("log", f"{server.uri}/outage-logs", max_retries=2, backoff=0.05, request_timeout=2.0)
    try:
        batches = [[chat_record(b * 100 + i) for i in range(100)] for b in range(6)]
        acknowledged = []
        for batch in batches[:3]:
            assert store.put_many(batch) == len(batch)
            acknowledged += [r["id"] for r in batch]

        server.stop()  # gone between two bulk requests of one ingest run
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=server.uri):
            store.put_many(batches[3])
        assert time.monotonic() - started < RETRY_BUDGET_S
        with pytest.raises(StoreUnavailable):
            store.count("w1", "c1")

        server = start_elasticsearch(server.data_dir, server.port)
        for batch in batches[3:]:  # the refused batch is resent (it may have half-landed), ingest goes on
            store.put_many(batch)
        stored = {r["id"] for r in store.export("w1", "c1")}
        assert set(acknowledged) <= stored
        assert store.count("w1", "c1") == 600
    finally:
        store.close()
        server.stop()


def test_mongodb_crash_mid_ingest_then_resume(tmp_path):
    server_uri("mongodb")
    server = start_mongodb(tmp_path / "mongo")
    audit = open_store("audit", server.uri, server_selection_timeout=1.0)
    jobs = open_store("job", server.uri, server_selection_timeout=1.0)
    acknowledged: list[int] = []
    outcome: list[BaseException] = []

    def ingest():
        i = 0
        while True:
            try:
                audit.append({"action": "ingest", "batch": i})
            except BaseException as exc:  # noqa: BLE001 - the test asserts which kind
                outcome.append(exc)
                return
            acknowledged.append(i)
            i += 1

    try:
        jobs.put_api_key("h1", "admin", "bootstrap")
        writer = threading.Thread(target=ingest)
        writer.start()
        while len(acknowledged) < 50:
            time.sleep(0.01)
        started = time.monotonic()
        server.stop(kill=True)  # a crash, mid-append
        writer.join(timeout=RETRY_BUDGET_S)
        assert not writer.is_alive()
        assert isinstance(outcome[0], StoreUnavailable) and server.uri in str(outcome[0])
        assert time.monotonic() - started < RETRY_BUDGET_S
        with pytest.raises(StoreUnavailable, match=server.uri):
            jobs.get_api_key("h1")

        server = start_mongodb(server.data_dir, server.port)
        resumed = audit.append({"action": "ingest", "batch": "after restart"})
        entries = list(audit.entries())
        stored = [e["event"]["batch"] for e in entries]
        assert set(acknowledged) <= set(stored)  # nothing acknowledged was lost
        assert entries[-1] == resumed
        assert [e["seq"] for e in entries] == list(range(len(entries)))
        assert all(e["hash"] == entry_hash(e) and e["prev_hash"] == p["hash"]
                   for p, e in zip(entries, entries[1:], strict=False))
        assert jobs.get_api_key("h1") == {"role": "admin", "name": "bootstrap"}
    finally:
        audit.close()
        jobs.close()
        server.stop()


def test_elasticsearch_refusals_are_reported_per_record():
    """An operator's own mapping that refuses some documents: those are named, the rest stored."""
    base = server_uri("elasticsearch")
    uri = f"{base}/strict-logs-{time.time_ns()}"
    index = uri.rsplit("/", 1)[1]
    with Elasticsearch(base.replace("elasticsearch://", "http://")) as es:
        es.indices.create(index=index, mappings={"properties": {"service_name": {"type": "long"},
                                                               "timestamp": {"type": "double"}}})
    store = open_store("log", uri)
    try:
        good, refused = chat_record(1), {**chat_record(2), "service_name": "checkout"}
        with pytest.raises(RecordsRejected) as caught:
            store.put_many([good, refused])
        assert caught.value.accepted == 1
        assert [r["id"] for r in caught.value.rejected] == [refused["id"]]
        assert "service_name" in caught.value.rejected[0]["reason"]
        assert store.get(good["id"]) == good and store.get(refused["id"]) is None
    finally:
        store.close()
        drop(uri)
