"""Logs in Elasticsearch: one index with explicit mappings, bulk `create`s, PIT export.

URI: `elasticsearch://[USER:PASSWORD@]HOST:PORT[/INDEX][?tls=true]` (index default `flywheel-logs`).

Semantics follow the SQLite reference store exactly: a record's `id` is its document
`_id` and it is written with `op_type=create`, so a resend is a 409 "already there", never
an overwrite; writes use `refresh=wait_for` so the next query sees them; `query` is newest
first and `export` oldest first, both ordered by (timestamp, id), export paged through a
point in time with `search_after` (no 10,000-hit ceiling). Transient failures (connection
errors, timeouts, 429/502/503/504) are retried with exponential backoff; when the budget
is spent the caller gets StoreUnavailable naming the URI.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlparse

from elasticsearch import ApiError, ConnectionError, ConnectionTimeout, Elasticsearch

from ray_app.errors import ConfigError, RecordsRejected, StoreUnavailable
from ray_app.storage.base import LogStore, record_problem

T = TypeVar("T")
SCHEMA_VERSION = 1
DEFAULT_INDEX = "flywheel-logs"
RETRY_STATUS = frozenset({429, 502, 503, 504})
MAX_WINDOW = 10_000  # Elasticsearch's index.max_result_window default: deeper reads page

# `dynamic: false`: a record is kept whole in _source but only these fields are indexed, so
# free-form request/response/metrics can never cause a mapping explosion or a type clash.
MAPPINGS: dict[str, Any] = {
    "dynamic": False,
    "_meta": {"flywheel_schema_version": SCHEMA_VERSION},
    "properties": {
        "id": {"type": "keyword"},
        "workload_id": {"type": "keyword"},
        "client_id": {"type": "keyword"},
        "workload_type": {"type": "keyword"},
        "service_name": {"type": "keyword"},
        "constitutional_hash": {"type": "keyword"},
        "timestamp": {"type": "double"},  # epoch seconds, exact to the microsecond: the sort key
        "@timestamp": {"type": "date", "format": "epoch_millis"},  # the same instant for Kibana; not returned
        "request": {"type": "object", "enabled": False},
        "response": {"type": "object", "enabled": False},
        "feedback": {"type": "object", "enabled": False},
    },
}


class ElasticLogStore(LogStore):
    def __init__(self, uri: str, *, max_retries: int = 4, backoff: float = 0.25, request_timeout: float = 10.0,
                 refresh: str | bool = "wait_for", bulk_docs: int = 1000):
        parsed = urlparse(uri)
        if parsed.scheme != "elasticsearch" or not parsed.hostname:
            raise ConfigError(f"log store URI {uri!r}: expected elasticsearch://HOST:PORT[/INDEX]")
        tls = parse_qs(parsed.query).get("tls", ["false"])[0].lower() in ("1", "true", "yes")
        self.uri = uri if parsed.password is None else uri.replace(f":{parsed.password}@", ":***@")
        self.index = parsed.path.strip("/") or DEFAULT_INDEX
        self.max_retries, self.backoff, self.refresh, self.bulk_docs = max_retries, backoff, refresh, bulk_docs
        auth = (parsed.username, parsed.password or "") if parsed.username else None
        # The client's own retries are off: ours back off between tries and end in StoreUnavailable.
        self._es = Elasticsearch(f"{'https' if tls else 'http'}://{parsed.hostname}:{parsed.port or 9200}",
                                 basic_auth=auth, request_timeout=request_timeout, max_retries=0,
                                 retry_on_timeout=False)
        self._ready = False  # index template and index made on first use, so a store down at start recovers

    # -- plumbing ------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., T], /, **kwargs: Any) -> T:
        for attempt in range(self.max_retries + 1):
            try:
                return fn(**kwargs)
            except (ConnectionError, ConnectionTimeout) as exc:
                error: Exception = exc
            except ApiError as exc:
                if exc.meta.status in (401, 403):
                    raise StoreUnavailable(f"Elasticsearch at {self.uri} refused {what}: {exc}") from exc
                if exc.meta.status not in RETRY_STATUS:
                    raise
                error = exc
            if attempt < self.max_retries:
                time.sleep(self.backoff * 2**attempt * random.uniform(0.5, 1.0))
        raise StoreUnavailable(f"Elasticsearch at {self.uri} is unavailable ({what} failed "
                               f"{self.max_retries + 1} times): {error}",
                               retry_after=max(1.0, self.backoff * 2**self.max_retries)) from error

    def _ensure(self) -> None:
        if self._ready:
            return
        self._call("put index template", self._es.indices.put_index_template, name=f"{self.index}-template",
                   index_patterns=[self.index], priority=200,
                   template={"settings": {"number_of_shards": 1}, "mappings": MAPPINGS})
        es = self._es.options(ignore_status=400)  # 400 resource_already_exists: fine
        self._call("create index", es.indices.create, index=self.index)
        meta = self._call("get mapping", self._es.indices.get_mapping, index=self.index)
        found = next(iter(meta.body.values()))["mappings"].get("_meta", {}).get("flywheel_schema_version", 0)
        if found > SCHEMA_VERSION:
            raise ConfigError(f"index {self.index!r} at {self.uri} has schema version {found}; "
                              f"this Flywheel understands up to {SCHEMA_VERSION}")
        self._ready = True

    def _filter(self, **equals: str | None) -> dict[str, Any]:
        return {"bool": {"filter": [{"term": {k: v}} for k, v in equals.items() if v is not None]}}

    # -- LogStore ------------------------------------------------------------------------

    def put_many(self, records: Sequence[dict[str, Any]]) -> int:
        self._ensure()
        rejected: list[dict[str, Any]] = []
        good = []
        for r in records:
            problem = record_problem(r)
            if problem:
                rejected.append({"id": r.get("id"), "reason": problem})
            else:
                good.append(r)
        new = sum(self._bulk_create(good[i:i + self.bulk_docs], rejected)
                  for i in range(0, len(good), self.bulk_docs))
        if rejected:
            raise RecordsRejected(f"{len(rejected)} of {len(records)} records refused by {self.uri}",
                                  accepted=new, rejected=rejected)
        return new

    def _bulk_create(self, chunk: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> int:
        """One bulk request per try; items the cluster was too busy for (429/503) go again."""
        new, pending, attempt = 0, chunk, 0
        while pending:
            ops: list[dict[str, Any]] = []
            for r in pending:
                ops += [{"create": {"_index": self.index, "_id": r["id"]}},
                        {**r, "@timestamp": int(r["timestamp"] * 1000)}]
            resp = self._call("bulk", self._es.bulk, operations=ops, refresh=self.refresh)
            retry = []
            for r, item in zip(pending, resp["items"], strict=True):
                result = item["create"]
                if result["status"] in (200, 201):
                    new += 1
                elif result["status"] == 409:  # version conflict on create: already stored
                    pass
                elif result["status"] in RETRY_STATUS:
                    retry.append(r)
                else:
                    err = result.get("error", {})
                    rejected.append({"id": r["id"], "reason": f"{err.get('type')}: {err.get('reason')}"})
            if retry and attempt >= self.max_retries:
                raise StoreUnavailable(f"Elasticsearch at {self.uri} kept refusing {len(retry)} records "
                                       f"as overloaded after {attempt + 1} tries")
            if retry:
                time.sleep(self.backoff * 2**attempt)
                attempt += 1
            pending = retry
        return new

    def get(self, record_id: str) -> dict[str, Any] | None:
        self._ensure()
        resp = self._call("get", self._es.options(ignore_status=404).get, index=self.index, id=record_id)
        return _record(resp["_source"]) if resp.get("found") else None

    def query(self, *, workload_id: str | None = None, client_id: str | None = None,
              limit: int = 100) -> list[dict[str, Any]]:
        self._ensure()
        query = self._filter(workload_id=workload_id, client_id=client_id)
        if limit <= MAX_WINDOW:
            resp = self._call("search", self._es.search, index=self.index, query=query, size=limit,
                              sort=[{"timestamp": "desc"}, {"id": "desc"}], track_total_hits=False)
            return [_record(h["_source"]) for h in resp["hits"]["hits"]]
        return list(self._scan(query, "desc", limit, MAX_WINDOW))

    def export(self, workload_id: str, client_id: str, *, limit: int | None = None,
               batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        self._ensure()
        yield from self._scan(self._filter(workload_id=workload_id, client_id=client_id), "asc", limit,
                              min(batch_size, MAX_WINDOW))

    def _scan(self, query: dict[str, Any], order: str, limit: int | None, page: int) -> Iterator[dict[str, Any]]:
        """search_after over a point in time: a consistent snapshot, constant memory, any depth."""
        pit = self._call("open point in time", self._es.open_point_in_time, index=self.index, keep_alive="2m")["id"]
        after, served = None, 0
        try:
            while limit is None or served < limit:
                size = page if limit is None else min(page, limit - served)
                resp = self._call("search", self._es.search, pit={"id": pit, "keep_alive": "2m"}, query=query,
                                  size=size, sort=[{"timestamp": order}, {"id": order}], search_after=after,
                                  track_total_hits=False)
                pit = resp.get("pit_id", pit)
                hits = resp["hits"]["hits"]
                for hit in hits:
                    served += 1
                    yield _record(hit["_source"])
                if len(hits) < size:
                    return
                after = hits[-1]["sort"]
        finally:
            try:
                self._es.close_point_in_time(id=pit)
            except (ApiError, ConnectionError, ConnectionTimeout):
                pass  # it expires by itself after keep_alive

    def workloads(self) -> list[dict[str, Any]]:
        self._ensure()
        aggs = {"w": {"terms": {"field": "workload_id", "size": MAX_WINDOW},
                      "aggs": {"c": {"terms": {"field": "client_id", "size": MAX_WINDOW}}}}}
        resp = self._call("aggregate", self._es.search, index=self.index, size=0, aggs=aggs)
        rows = [{"workload_id": w["key"], "client_id": c["key"], "count": c["doc_count"]}
                for w in resp["aggregations"]["w"]["buckets"] for c in w["c"]["buckets"]]
        return sorted(rows, key=lambda r: (r["workload_id"], r["client_id"]))

    def count(self, workload_id: str, client_id: str) -> int:
        self._ensure()
        query = self._filter(workload_id=workload_id, client_id=client_id)
        return self._call("count", self._es.count, index=self.index, query=query)["count"]

    def set_feedback(self, record_id: str, feedback: dict[str, Any]) -> bool:
        self._ensure()
        es = self._es.options(ignore_status=404)
        resp = self._call("update", es.update, index=self.index, id=record_id, doc={"feedback": feedback},
                          refresh=self.refresh, retry_on_conflict=5)
        return resp.meta.status != 404

    def ping(self) -> None:
        try:
            self._call("ping", self._es.info)
        except ApiError as exc:
            raise StoreUnavailable(f"Elasticsearch at {self.uri} answered {exc.meta.status}: {exc}") from exc
        self._ensure()

    def close(self) -> None:
        self._es.close()


def _record(source: dict[str, Any]) -> dict[str, Any]:
    source.pop("@timestamp", None)
    return source
