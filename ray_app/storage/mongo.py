"""Jobs, API keys, named documents and the audit chain in MongoDB.

URI: any MongoDB connection string with a database, `mongodb://HOST:PORT/DB` (default DB
`flywheel`). Collections: `jobs`, `api_keys`, `docs`, `audit`, and `meta` (the schema version).

Several Ray processes update the same job, so every read-modify-write is optimistic: read
the document with its `_version`, apply `mutate` in Python, write back only if `_version` is
unchanged (`find_one_and_replace` on {_id, _version}), else re-read and try again. The audit
chain appends the same way, with the unique index on `seq` as the referee: two writers that
read the same tail both compute seq N, one insert wins, the other gets DuplicateKeyError and
rebuilds its entry on the new tail. Internal fields (`_id`, `_version`, `_schema`) never
leave this module.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from functools import wraps
from typing import Any
from urllib.parse import urlparse

import pymongo
from pymongo import ASCENDING, DESCENDING
from pymongo.errors import ConnectionFailure, DuplicateKeyError, OperationFailure

from ray_app.errors import Conflict, NotFound, StoreUnavailable
from ray_app.storage.base import AuditStore, JobDict, JobStore, chain_entry

SCHEMA_VERSION = 1
DEFAULT_DB = "flywheel"
MAX_TRIES = 1000  # optimistic retries before giving up: only reached under pathological contention
INTERNAL = ("_id", "_version", "_schema")


def _unavailable_on_network_error(method):
    """AutoReconnect, NetworkTimeout and ServerSelectionTimeout (all ConnectionFailure) -> StoreUnavailable."""

    @wraps(method)
    def wrapper(self: _Mongo, *args, **kwargs):
        try:
            result = method(self, *args, **kwargs)
        except ConnectionFailure as exc:
            raise StoreUnavailable(f"MongoDB at {self.uri} is unavailable: {exc}") from exc
        if isinstance(result, Iterator):
            return self._guard_iter(result)
        return result

    return wrapper


class _Mongo:
    """One client per store; collections and indexes made on first use."""

    def __init__(self, uri: str, *, server_selection_timeout: float = 5.0):
        parsed = urlparse(uri)
        self.uri = uri if parsed.password is None else uri.replace(f":{parsed.password}@", ":***@")
        timeout_ms = int(server_selection_timeout * 1000)
        self._client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms,
                                           tz_aware=False, w="majority", journal=True)
        self._db = self._client.get_database(parsed.path.strip("/") or DEFAULT_DB)
        self._ready = False

    def _guard_iter(self, it: Iterator) -> Iterator:
        try:
            yield from it
        except ConnectionFailure as exc:
            raise StoreUnavailable(f"MongoDB at {self.uri} is unavailable: {exc}") from exc

    def _ensure(self) -> None:
        if self._ready:
            return
        try:
            self._db.meta.update_one({"_id": "schema"},
                                     {"$setOnInsert": {"version": SCHEMA_VERSION, "created_at": time.time()}},
                                     upsert=True)
        except DuplicateKeyError:
            pass  # two processes upserted at once: the other one made it
        meta = self._db.meta.find_one({"_id": "schema"})
        if meta["version"] > SCHEMA_VERSION:
            raise StoreUnavailable(f"MongoDB database at {self.uri} has schema version {meta['version']}; "
                                   f"this Flywheel understands up to {SCHEMA_VERSION}")
        self._indexes()
        self._ready = True

    def _indexes(self) -> None:
        raise NotImplementedError

    @_unavailable_on_network_error
    def ping(self) -> None:
        try:
            self._client.admin.command("ping")
        except OperationFailure as exc:  # e.g. bad credentials: reachable but not usable
            raise StoreUnavailable(f"MongoDB at {self.uri} refused ping: {exc}") from exc
        self._ensure()

    def close(self) -> None:
        self._client.close()


def _public(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    if doc is None:
        return None
    for key in INTERNAL:
        doc.pop(key, None)
    return doc


def _pause(attempt: int) -> None:
    """Jittered, capped backoff so optimistic writers that collided don't collide again in lockstep."""
    time.sleep(random.uniform(0, min(0.05, 0.001 * 2**min(attempt, 6))))


class MongoJobStore(_Mongo, JobStore):
    def _indexes(self) -> None:
        # Job ids and key hashes are the _id: unique by construction.
        self._db.jobs.create_index([("workload_id", ASCENDING), ("client_id", ASCENDING),
                                    ("created_at", DESCENDING)], name="jobs_by_workload")
        self._db.jobs.create_index([("status", ASCENDING), ("created_at", DESCENDING)], name="jobs_by_status")
        self._db.jobs.create_index([("created_at", DESCENDING)], name="jobs_by_created")
        self._db.docs.create_index([("collection", ASCENDING), ("id", ASCENDING)], unique=True, name="docs_key")

    @_unavailable_on_network_error
    def create_job(self, job: JobDict) -> JobDict:
        self._ensure()
        try:
            self._db.jobs.insert_one({**job, "_id": job["id"], "_version": 1, "_schema": SCHEMA_VERSION})
        except DuplicateKeyError as exc:
            raise Conflict(f"a job with id {job['id']!r} already exists", field="id") from exc
        return job

    @_unavailable_on_network_error
    def get_job(self, job_id: str) -> JobDict:
        self._ensure()
        doc = self._db.jobs.find_one({"_id": job_id})
        if doc is None:
            raise NotFound(f"no job with id {job_id!r}", field="id")
        return _public(doc)

    @_unavailable_on_network_error
    def list_jobs(self, *, workload_id: str | None = None, client_id: str | None = None,
                  status: str | None = None, limit: int = 100) -> list[JobDict]:
        self._ensure()
        where = {k: v for k, v in (("workload_id", workload_id), ("client_id", client_id), ("status", status))
                 if v is not None}
        if limit <= 0:  # Mongo reads limit(0) as "no limit"
            return []
        cursor = self._db.jobs.find(where).sort([("created_at", DESCENDING), ("_id", DESCENDING)]).limit(limit)
        return [_public(d) for d in cursor]

    @_unavailable_on_network_error
    def update_job(self, job_id: str, mutate: Callable[[JobDict], None]) -> JobDict:
        self._ensure()
        for attempt in range(MAX_TRIES):
            doc = self._db.jobs.find_one({"_id": job_id})
            if doc is None:
                raise NotFound(f"no job with id {job_id!r}", field="id")
            version = doc["_version"]
            job = _public(doc)
            mutate(job)  # may raise Conflict: nothing written
            job["updated_at"] = time.time()
            if self._db.jobs.find_one_and_replace(
                    {"_id": job_id, "_version": version},
                    {**job, "_version": version + 1, "_schema": SCHEMA_VERSION},
                    projection={"_id": True}) is not None:
                return job
            _pause(attempt)  # someone else wrote first: re-read and re-apply
        raise Conflict(f"job {job_id!r} is updated too often to apply a change ({MAX_TRIES} tries)", field="id")

    @_unavailable_on_network_error
    def delete_job(self, job_id: str) -> None:
        self._ensure()
        if self._db.jobs.delete_one({"_id": job_id}).deleted_count == 0:
            raise NotFound(f"no job with id {job_id!r}", field="id")

    @_unavailable_on_network_error
    def put_api_key(self, key_hash: str, role: str, name: str) -> None:
        self._ensure()
        self._db.api_keys.replace_one(
            {"_id": key_hash},
            {"role": role, "name": name, "created_at": time.time(), "_schema": SCHEMA_VERSION}, upsert=True)

    @_unavailable_on_network_error
    def get_api_key(self, key_hash: str) -> dict[str, Any] | None:
        self._ensure()
        return self._db.api_keys.find_one({"_id": key_hash}, projection={"_id": False, "role": True, "name": True})

    @_unavailable_on_network_error
    def get_doc(self, collection: str, doc_id: str) -> dict[str, Any] | None:
        self._ensure()
        row = self._db.docs.find_one({"collection": collection, "id": doc_id})
        return row["doc"] if row else None

    @_unavailable_on_network_error
    def update_doc(self, collection: str, doc_id: str,
                   mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        self._ensure()
        key = {"collection": collection, "id": doc_id}
        for attempt in range(MAX_TRIES):
            row = self._db.docs.find_one(key)
            doc = row["doc"] if row else {}
            mutate(doc)
            if row is None:
                try:
                    self._db.docs.insert_one({**key, "doc": doc, "_version": 1, "_schema": SCHEMA_VERSION})
                    return doc
                except DuplicateKeyError:
                    pass  # created meanwhile by another writer
            elif self._db.docs.find_one_and_update(
                    {**key, "_version": row["_version"]},
                    {"$set": {"doc": doc, "_version": row["_version"] + 1, "_schema": SCHEMA_VERSION}},
                    projection={"_id": True}) is not None:
                return doc
            _pause(attempt)
        raise Conflict(f"document {collection}/{doc_id} is updated too often to apply a change", field="id")

    @_unavailable_on_network_error
    def list_docs(self, collection: str) -> list[tuple[str, dict[str, Any]]]:
        self._ensure()
        return [(row["id"], row["doc"]) for row in self._db.docs.find({"collection": collection}).sort("id", ASCENDING)]


class MongoAuditStore(_Mongo, AuditStore):
    def _indexes(self) -> None:
        self._db.audit.create_index([("seq", ASCENDING)], unique=True, name="audit_seq")

    @_unavailable_on_network_error
    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        self._ensure()
        for attempt in range(MAX_TRIES):
            tail = self._db.audit.find_one({}, sort=[("seq", DESCENDING)])
            entry = chain_entry(_public(tail), event)
            try:
                self._db.audit.insert_one({**entry, "_schema": SCHEMA_VERSION})
                return entry
            except DuplicateKeyError:
                _pause(attempt)  # another writer took this seq: chain onto its entry instead
        raise Conflict(f"audit chain at {self.uri} too contended to append ({MAX_TRIES} tries)")

    @_unavailable_on_network_error
    def entries(self, *, start_seq: int = 0, limit: int | None = None) -> Iterator[dict[str, Any]]:
        self._ensure()
        cursor = self._db.audit.find({"seq": {"$gte": start_seq}}).sort("seq", ASCENDING).batch_size(1000)
        if limit is not None:
            if limit <= 0:  # Mongo reads limit(0) as "no limit"
                return iter(())
            cursor = cursor.limit(limit)
        return (_public(d) for d in cursor)

