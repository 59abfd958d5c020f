"""Prometheus metrics with the ACGS names, registered into a registry the caller owns.

Nothing is registered at import time: `governance_metrics(registry)` creates them (once per
registry), so tests and several apps in one process never collide.
"""
from __future__ import annotations

from collections import Counter as Counts
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

COMPLIANCE_BUCKETS = (0.5, 0.8, 0.9, 0.95, 0.99, 1.0)


@dataclass(frozen=True)
class GovernanceMetrics:
    evaluations: Counter           # constitutional_evaluations_total{rule, result}
    compliance: Histogram          # constitutional_compliance_score (scores in [0, 1])
    violations: Counter            # constitutional_violations_total{type}
    optimization_cycles: Counter   # model_optimization_cycles_total{trigger_type, success}
    privacy_budget: Gauge          # privacy_budget_remaining{workload_id, client_id}
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
        optimization_cycles=Counter("model_optimization_cycles_total", "Flywheel optimization cycles",
                                    ["trigger_type", "success"], registry=registry),
        privacy_budget=Gauge("privacy_budget_remaining", "Remaining differential-privacy epsilon budget",
                             ["workload_id", "client_id"], registry=registry),
        pii_scrubbed=Counter("pii_scrubbed_total", "PII values scrubbed at ingest", ["type"], registry=registry),
    )
