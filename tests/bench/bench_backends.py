"""Bulk-insert rate of each backend: its own client, then Flywheel's store over it.

Records are realistic ~1 KB tool-calling chat records sent in 1,000-record batches. The
"client" rows are the ceiling a backend offers (elasticsearch-py `bulk` with create ops,
pymongo `insert_many` unordered, sqlite3 `executemany`); the "store" rows are
`LogStore.put_many` / what `flywheel load` and the ingest path pay, idempotency checks and
refresh-before-ack included. Servers: the ones `make test` exports if set, else started here.
"""
from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from pathlib import Path

import orjson
import pymongo
from elasticsearch import Elasticsearch

from tests.servers import ES_ENV, MONGO_ENV, start_elasticsearch, start_mongodb
from tests.store_support import chat_record, drop, open_store

TOTAL, BATCH = 20_000, 1_000


def _records(tag: str) -> list[dict]:
    return [chat_record(i, workload_id=f"bench-{tag}", padding=200) for i in range(TOTAL)]


def _rate(write, records: list[dict]) -> float:
    started = time.perf_counter()
    for i in range(0, len(records), BATCH):
        write(records[i:i + BATCH])
    return len(records) / (time.perf_counter() - started)


def _es_client_rate(base_uri: str) -> float:
    index = f"bench-client-{time.time_ns()}"
    with Elasticsearch(base_uri.replace("elasticsearch://", "http://"), request_timeout=60) as es:
        es.indices.create(index=index)

        def write(batch):
            ops = [x for r in batch for x in ({"create": {"_index": index, "_id": r["id"]}}, r)]
            assert not es.bulk(operations=ops, refresh="wait_for")["errors"]

        try:
            return _rate(write, _records("es-client"))
        finally:
            es.indices.delete(index=index)


def _mongo_client_rate(base_uri: str) -> float:
    with pymongo.MongoClient(base_uri, journal=True) as client:
        coll = client.get_default_database()[f"bench_client_{time.time_ns()}"]
        try:
            return _rate(lambda batch: coll.insert_many([{**r, "_id": r["id"]} for r in batch], ordered=False),
                         _records("mongo-client"))
        finally:
            coll.drop()


def _sqlite_client_rate(path: Path) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE logs (id TEXT PRIMARY KEY, body BLOB)")

    def write(batch):
        conn.execute("BEGIN")
        conn.executemany("INSERT OR IGNORE INTO logs VALUES (?, ?)", [(r["id"], orjson.dumps(r)) for r in batch])
        conn.execute("COMMIT")

    try:
        return _rate(write, _records("sqlite-client"))
    finally:
        conn.close()


def _store_rate(uri: str) -> float:
    store = open_store("log", uri)
    try:
        return _rate(store.put_many, _records("store"))
    finally:
        store.close()
        drop(uri)


def _serve_rate(log_store: str | None, name: str) -> float:
    """Records/s through POST /v1/logs of an app whose log store is `log_store` (None: embedded)."""
    from urllib.parse import urlparse

    from serve.launch import deploy
    from tests.bench.harness import start_app, throughput

    url, settings = start_app()
    if log_store:
        url = deploy(settings.with_overrides({"log_store": log_store}), port=urlparse(url).port,
                     name=name, route_prefix=f"/{name}")
    bodies = [orjson.dumps({"records": [{k: v for k, v in r.items() if k != "id"} for r in batch]})
              for batch in (lambda rs: [rs[i:i + BATCH] for i in range(0, len(rs), BATCH)])(_records(name))]
    return throughput(f"{url}/v1/logs", bodies) * BATCH


def run() -> list[dict]:
    size = len(orjson.dumps(_records("size")[0]))
    note = f"{size} B records, {BATCH}-record batches, {TOTAL:,} records, 2 CPUs"
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        started = []
        es_uri, mongo_uri = os.environ.get(ES_ENV), os.environ.get(MONGO_ENV)
        try:
            if not es_uri:
                started.append(start_elasticsearch(Path(tmp) / "es"))
                es_uri = started[-1].uri
            if not mongo_uri:
                started.append(start_mongodb(Path(tmp) / "mongo"))
                mongo_uri = started[-1].uri
            measured = [
                ("sqlite", "sqlite3 executemany", _sqlite_client_rate(Path(tmp) / "client.db"),
                 [("store put_many", _store_rate(f"sqlite:///{Path(tmp) / 'store.db'}")),
                  ("through Serve POST /v1/logs", _serve_rate(None, "sqlite"))], "embedded, WAL"),
                ("elasticsearch", "elasticsearch-py bulk create", _es_client_rate(es_uri),
                 [("ElasticLogStore.put_many", _store_rate(f"{es_uri}/bench-store-{time.time_ns()}")),
                  ("through Serve POST /v1/logs", _serve_rate(f"{es_uri}/bench-serve-{time.time_ns()}", "es"))],
                 "noida-db emulator, refresh=wait_for"),
                ("mongodb", "pymongo insert_many", _mongo_client_rate(mongo_uri), [],
                 "SecantusDB, --sync-on-commit, journaled writes (jobs and audit live here, not logs)"),
            ]
        finally:
            for server in started:
                server.stop()
    for backend, client_name, client_rate, ours, where in measured:
        rows.append({"benchmark": "backends", "metric": f"{backend}: {client_name}", "value": client_rate,
                     "unit": "rec/s", "goal": "", "note": f"{note}; {where}"})
        for name, rate in ours:
            rows.append({"benchmark": "backends", "metric": f"{backend}: {name}", "value": rate, "unit": "rec/s",
                         "goal": "", "note": f"{rate / client_rate:.0%} of the client's own bulk rate, same run"})
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
