"""What the store tests share: backend URIs, opening a store by URI, realistic records, racing processes.

Opening goes through the registry's tables (the same import paths the app uses), and takes
a URI plus keyword options, so a worker process can open its own store from two strings.
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import uuid
from typing import Any

import pytest

from ray_app.schemas import normalize
from ray_app.storage.registry import AUDIT_STORES, JOB_STORES, LOG_STORES
from tests.servers import ES_ENV, MONGO_ENV

TABLES = {"log": LOG_STORES, "job": JOB_STORES, "audit": AUDIT_STORES}
SERVER_ENV = {"elasticsearch": ES_ENV, "mongodb": MONGO_ENV}
HASH = "cdd01ef066bc6cf2"


def open_store(kind: str, uri: str, **options: Any):
    scheme = uri.split(":", 1)[0]
    module, _, name = TABLES[kind][scheme].partition(":")
    cls = getattr(importlib.import_module(module), name)
    return cls(uri.removeprefix("sqlite:///") if scheme == "sqlite" else uri, **options)


def server_uri(backend: str) -> str:
    """The test server's base URI, or a skip that says how to get one."""
    env = SERVER_ENV[backend]
    uri = os.environ.get(env)
    if not uri:
        pytest.skip(f"{env} is not set: run `make test` (python tests/servers.py -- python -m pytest ...) "
                    f"to test the {backend} backend against a real server")
    return uri


def fresh_uri(backend: str, tmp_path, name: str) -> str:
    """A URI of an empty store: a new file, a new index or a new database."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / f'{name}.db'}"
    tag = uuid.uuid4().hex[:12]
    if backend == "elasticsearch":
        return f"{server_uri(backend)}/fwtest-{name}-{tag}"
    base = server_uri(backend).rsplit("/", 1)[0]
    return f"{base}/fwtest_{name}_{tag}"


def drop(uri: str) -> None:
    """Remove what a test made on a shared server (sqlite files go with tmp_path)."""
    scheme = uri.split(":", 1)[0]
    if scheme == "elasticsearch":
        from elasticsearch import Elasticsearch

        host, index = uri.split("://", 1)[1].split("/", 1)
        with Elasticsearch(f"http://{host}") as es:
            es.options(ignore_status=404).indices.delete(index=index)
            es.options(ignore_status=404).indices.delete_index_template(name=f"{index}-template")
    elif scheme == "mongodb":
        import pymongo

        base, db = uri.rsplit("/", 1)
        with pymongo.MongoClient(base + "/", serverSelectionTimeoutMS=2000) as client:
            client.drop_database(db)


def chat_record(i: int, *, workload_id: str = "w1", client_id: str = "c1", ts: float | None = None,
                padding: int = 0) -> dict[str, Any]:
    """A normalized tool-calling chat record, as the ingest path stores it (~1 KB with padding=600)."""
    raw = {
        "id": f"rec-{workload_id}-{client_id}-{i:06d}",
        "timestamp": 1_700_000_000.0 + (i if ts is None else ts) + 0.123456,
        "workload_id": workload_id, "client_id": client_id,
        "request": {"model": "meta/llama-3.1-70b-instruct",
                    "messages": [{"role": "system", "content": "You route customer requests." + " " * padding},
                                 {"role": "user", "content": f"Where is order #{i}?"}],
                    "tools": [{"type": "function", "function": {"name": "track_order",
                                                                "parameters": {"type": "object"}}}]},
        "response": {"id": f"chatcmpl-{i}", "object": "chat.completion",
                     "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                         "role": "assistant", "content": None,
                         "tool_calls": [{"id": f"call-{i}", "type": "function", "function": {
                             "name": "track_order", "arguments": f'{{"order_id": {i}}}'}}]}}],
                     "usage": {"prompt_tokens": 42, "completion_tokens": 9}},
        "performance_metrics": {"latency_ms": 120.5 + i % 7, "tokens": {"in": 42, "out": 9}},
    }
    return normalize(raw, constitutional_hash=HASH)


def in_processes(fn, args_list: list[tuple]) -> list:
    """fn(barrier, *args) in one spawned process per args; all pass the barrier together, then race."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(args_list)), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(fn, barrier, results, i, args)) for i, args in enumerate(args_list)]
    for p in procs:
        p.start()
    got = dict((i, (value, error)) for i, value, error in (results.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=30)
    errors = [error for _, error in got.values() if error]
    assert not errors, errors
    return [got[i][0] for i in range(len(procs))]


def _worker(fn, barrier, results, i, args):
    try:
        results.put((i, fn(barrier, *args), None))
    except BaseException as exc:  # noqa: BLE001 - reported to the test, which fails naming it
        results.put((i, None, f"worker {i}: {exc!r}"))
