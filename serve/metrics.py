"""Prometheus metrics of the Serve app, registered per replica (nothing at import time)."""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

# Ingest batches take ~1 ms to ~1 s; finer buckets at the low end where single posts land.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class ServeMetrics:
    registry: CollectorRegistry
    ingested: Counter
    duplicates: Counter
    requests: Counter
    rejects: Counter
    latency: Histogram

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def create_metrics(registry: CollectorRegistry | None = None) -> ServeMetrics:
    registry = registry or CollectorRegistry()
    return ServeMetrics(
        registry=registry,
        ingested=Counter("flywheel_ingest_records", "Log records stored (new ids)",
                         ["workload_type"], registry=registry),
        duplicates=Counter("flywheel_ingest_duplicates", "Records whose id was already stored", registry=registry),
        requests=Counter("flywheel_http_requests", "HTTP requests", ["route", "code"], registry=registry),
        rejects=Counter("flywheel_ingest_rejects", "Rejected ingest requests by reason", ["reason"],
                        registry=registry),
        latency=Histogram("flywheel_ingest_latency_seconds", "POST /v1/logs latency", buckets=LATENCY_BUCKETS,
                          registry=registry),
    )
