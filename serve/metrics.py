"""Prometheus metrics of the Serve app (nothing registered at import time).

Ingest runs as several replicas (processes), so the metrics use prometheus-client's
multiprocess mode: each replica writes its samples to files in a shared folder
(`PROMETHEUS_MULTIPROC_DIR`, set for the replicas by `deploy`) and `/metrics` sums them,
so any replica answers for all of them. `collectors` (read at scrape time, such as the
governance StoreCollector) go into the registry /metrics is built from.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

# Ingest batches take ~1 ms to ~1 s; finer buckets at the low end where single posts land.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Gateway calls: milliseconds through the upstream, seconds when a CPU model decodes.
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class ServeMetrics:
    ingested: Counter
    duplicates: Counter
    rejects: Counter
    latency: Histogram
    routed: Counter  # gateway calls by workload, who answered, and the route's mode
    call_latency: Histogram
    live_agreement: Gauge
    rollbacks: Counter
    http_requests: Counter  # every request by route template, method and status (errors: status >= 400)
    http_latency: Histogram
    multiproc_dir: Path | None
    registry: CollectorRegistry
    collectors: list[Collector] = field(default_factory=list)

    def exposition(self) -> bytes:
        if self.multiproc_dir is None:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        MultiProcessCollector(combined, path=str(self.multiproc_dir))
        for collector in self.collectors:
            combined.register(collector)
        return generate_latest(combined)


class RequestMetrics:
    """ASGI middleware: every HTTP request counted by route template (`/v1/jobs/{job_id}`, not the id),
    method and status, and timed. Plain ASGI, not BaseHTTPMiddleware: no task per request on the hot
    path. The replica hands its metrics over through the app's state (`api.state.metrics`)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        metrics = getattr(getattr(scope.get("app"), "state", None), "metrics", None)
        if scope["type"] != "http" or metrics is None:
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500  # no response started: the server answers 500

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.http_requests.labels(route, scope["method"], str(status)).inc()
            metrics.http_latency.labels(route, scope["method"]).observe(time.perf_counter() - started)


def create_metrics(multiproc_dir: Path | None = None, collectors: list[Collector] | None = None) -> ServeMetrics:
    # In multiprocess mode samples go to files, not to a registry: register nowhere then.
    registry = CollectorRegistry()
    target = None if multiproc_dir else registry
    for collector in collectors or []:
        registry.register(collector)
    return ServeMetrics(
        ingested=Counter("flywheel_ingest_records", "Log records stored (new ids)", ["workload_type"],
                         registry=target),
        duplicates=Counter("flywheel_ingest_duplicates", "Records whose id was already stored", registry=target),
        rejects=Counter("flywheel_ingest_rejects", "Rejected ingest requests by reason", ["reason"],
                        registry=target),
        latency=Histogram("flywheel_ingest_latency_seconds", "POST /v1/logs latency", buckets=LATENCY_BUCKETS,
                          registry=target),
        routed=Counter("flywheel_routed_requests", "Gateway calls by who answered", ["workload_id", "model", "mode"],
                       registry=target),
        call_latency=Histogram("flywheel_gateway_latency_seconds", "Gateway call latency by who answered and mode",
                               ["model", "mode"], buckets=CALL_BUCKETS, registry=target),
        live_agreement=Gauge("flywheel_live_agreement", "A served model's agreement with the upstream, last window",
                             ["workload_id", "model"], multiprocess_mode="mostrecent", registry=target),
        rollbacks=Counter("flywheel_rollbacks", "Routes sent back to the upstream by the rollback rule",
                          ["workload_id", "model"], registry=target),
        http_requests=Counter("flywheel_http_requests", "HTTP requests by route, method and status",
                              ["route", "method", "status"], registry=target),
        http_latency=Histogram("flywheel_http_request_duration_seconds", "HTTP request latency by route and method",
                               ["route", "method"], buckets=CALL_BUCKETS, registry=target),
        multiproc_dir=multiproc_dir,
        registry=registry,
        collectors=list(collectors or []),
    )
