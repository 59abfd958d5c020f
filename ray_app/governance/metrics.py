"""Prometheus metrics with the ACGS names, registered into a registry the caller owns.

Nothing is registered at import time: `governance_metrics(registry)` creates them (once per
registry), so tests and several apps in one process never collide.

Two ACGS metrics describe state the JobStore already holds, so they are not counted in process
(the Serve replicas never see a job finish) but read from the store at scrape time by
`StoreCollector`: `model_optimization_cycles_total{trigger_type, success}` (finished jobs by
trigger and outcome) and, per privacy ledger, `privacy_epsilon_spent{workload_id, client_id}` and
`privacy_budget_remaining{workload_id, client_id}` (only with `privacy.budget_epsilon` set).
"""
from __future__ import annotations

import threading
import time
from collections import Counter as Counts
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

from ray_app import privacy
from ray_app.schemas import JobStatus
from ray_app.storage.base import JobStore

COMPLIANCE_BUCKETS = (0.5, 0.8, 0.9, 0.95, 0.99, 1.0)


@dataclass(frozen=True)
class GovernanceMetrics:
    evaluations: Counter           # constitutional_evaluations_total{rule, result}
    compliance: Histogram          # constitutional_compliance_score (scores in [0, 1])
    violations: Counter            # constitutional_violations_total{type}
    pii_scrubbed: Counter          # pii_scrubbed_total{type}

    def observe_validation(self, result: dict) -> None:
        """Count one /v1/validate result (the Validator's dict)."""
        self.evaluations.labels(rule="content_validation", result="allow" if result["allow"] else "deny").inc()
        self.compliance.observe(result["compliance_score"])
        for violation in result["violations"]:
            self.violations.labels(type=violation).inc()

    def observe_decision(self, decision) -> None:
        self.evaluations.labels(rule=decision.rule, result="allow" if decision.allow else "deny").inc()

    def observe_scrub(self, counts: Counts[str] | Iterable[tuple[str, int]]) -> None:
        for kind, n in (counts.items() if isinstance(counts, dict) else counts):
            if n:
                self.pii_scrubbed.labels(type=kind).inc(n)


def governance_metrics(registry: CollectorRegistry) -> GovernanceMetrics:
    return GovernanceMetrics(
        evaluations=Counter("constitutional_evaluations_total", "Constitutional policy evaluations",
                            ["rule", "result"], registry=registry),
        compliance=Histogram("constitutional_compliance_score", "Constitutional compliance scores",
                             buckets=COMPLIANCE_BUCKETS, registry=registry),
        violations=Counter("constitutional_violations_total", "Constitutional violations detected", ["type"],
                           registry=registry),
        pii_scrubbed=Counter("pii_scrubbed_total", "PII values scrubbed at ingest", ["type"], registry=registry),
    )


FINISHED = tuple(s.value for s in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED))


class StoreCollector:
    """Metrics computed from the JobStore when scraped (a custom prometheus collector).

    A scrape reads at most `job_limit` finished jobs per status and every privacy ledger, and
    the answer is kept `cache_seconds`, so scrapers hitting several replicas stay cheap.
    """

    def __init__(self, jobs: JobStore, *, budget_epsilon: float | None, delta: float, job_limit: int = 10_000,
                 cache_seconds: float = 5.0):
        self.jobs = jobs
        self.budget_epsilon = budget_epsilon
        self.delta = delta
        self.job_limit = job_limit
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def describe(self) -> list[Metric]:
        return []  # registering must not read the store

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > self.cache_seconds:
                finished = [(status, job) for status in FINISHED
                            for job in self.jobs.list_jobs(status=status, limit=self.job_limit)]
                self._cached = (time.monotonic(), [self._cycles(finished), *self._durations(finished),
                                                   *self._privacy()])
            yield from self._cached[1]

    @staticmethod
    def _cycles(finished: list[tuple[str, dict]]) -> Metric:
        family = CounterMetricFamily("model_optimization_cycles", "Finished flywheel jobs by trigger and outcome",
                                     labels=["trigger_type", "success"])
        counts = Counts()
        for status, job in finished:
            counts[(job.get("trigger") or "api", "true" if status == JobStatus.COMPLETED else "false")] += 1
        for (trigger, success), n in sorted(counts.items()):
            family.add_metric([trigger, success], n)
        return family

    @staticmethod
    def _durations(finished: list[tuple[str, dict]]) -> list[Metric]:
        """Wall time of finished jobs (by outcome) and of their completed stages (a candidate's
        `MODEL:step` counted under `step`, so the label stays a handful of values)."""
        jobs = SummaryMetricFamily("flywheel_job_duration_seconds", "Finished flywheel jobs' wall time by outcome",
                                   labels=["status"])
        stages = SummaryMetricFamily("flywheel_job_stage_duration_seconds", "Completed job stages' wall time",
                                     labels=["stage"])
        by_status: dict[str, list[float]] = defaultdict(list)
        by_stage: dict[str, list[float]] = defaultdict(list)
        for status, job in finished:
            if job.get("started_at") and job.get("finished_at"):
                by_status[str(status)].append(job["finished_at"] - job["started_at"])
            for stage in job.get("stages") or []:
                if stage.get("status") == JobStatus.COMPLETED and stage.get("started_at") and stage.get("finished_at"):
                    by_stage[stage["name"].rsplit(":", 1)[-1]].append(stage["finished_at"] - stage["started_at"])
        for family, values in ((jobs, by_status), (stages, by_stage)):
            for label, seconds in sorted(values.items()):
                family.add_metric([label], count_value=len(seconds), sum_value=sum(seconds))
        return [jobs, stages]

    def _privacy(self) -> list[Metric]:
        spent = GaugeMetricFamily("privacy_epsilon_spent", "Differential-privacy epsilon spent: the most exposed "
                                  "record's, RDP-composed over the DP trainings that used it",
                                  labels=["workload_id", "client_id"])
        remaining = GaugeMetricFamily("privacy_budget_remaining", "privacy.budget_epsilon minus the epsilon spent",
                                      labels=["workload_id", "client_id"])
        for workload_id, client_id in privacy.ledger_keys(self.jobs):
            read = privacy.read_ledger(self.jobs, workload_id, client_id)
            ledger = privacy.summary(read, privacy.record_sets(self.jobs, read), delta=self.delta,
                                     budget_epsilon=self.budget_epsilon)
            spent.add_metric([workload_id, client_id], ledger["epsilon_spent"])
            if ledger["budget_remaining"] is not None:
                remaining.add_metric([workload_id, client_id], ledger["budget_remaining"])
        return [spent, remaining] if self.budget_epsilon is not None else [spent]
