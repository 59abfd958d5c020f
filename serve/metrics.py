"""Prometheus metrics of the Serve app (nothing registered at import time).

Ingest runs as several replicas (processes), so the metrics use prometheus-client's
multiprocess mode: each replica writes its samples to files in a shared folder
(`PROMETHEUS_MULTIPROC_DIR`, set for the replicas by `deploy`) and `/metrics` sums them,
so any replica answers for all of them. `collectors` (read at scrape time, such as the
governance StoreCollector) go into the registry /metrics is built from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.multiprocess import MultiProcessCollector

# Ingest batches take ~1 ms to ~1 s; finer buckets at the low end where single posts land.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class ServeMetrics:
    ingested: Counter
    duplicates: Counter
    rejects: Counter
    latency: Histogram
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
        multiproc_dir=multiproc_dir,
        registry=registry,
        collectors=list(collectors or []),
    )
