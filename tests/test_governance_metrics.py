"""Governance metrics: ACGS names, registered only into the registry given."""
from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest

from ray_app.governance.metrics import governance_metrics
from ray_app.governance.policy import Decision


def test_metrics_register_per_registry_and_expose_acgs_names():
    first, second = CollectorRegistry(), CollectorRegistry()
    m = governance_metrics(first)
    governance_metrics(second)  # no global state: a second registry works
    m.observe_validation({"allow": False, "compliance_score": 0.5, "violations": ["bias:gender"]})
    m.observe_decision(Decision(allow=True, rule="promotion", constitutional_hash="h"))
    m.observe_scrub(Counter({"email": 2, "phone": 1}))
    text = generate_latest(first).decode()
    for line in ['constitutional_evaluations_total{result="deny",rule="content_validation"} 1.0',
                 'constitutional_evaluations_total{result="allow",rule="promotion"} 1.0',
                 "constitutional_compliance_score_count 1.0",
                 'constitutional_violations_total{type="bias:gender"} 1.0',
                 'pii_scrubbed_total{type="email"} 2.0']:
        assert line in text, line
    assert "pii_scrubbed_total{" not in generate_latest(second).decode()
    # Computed from the JobStore at scrape time (StoreCollector), never counted in process.
    assert "model_optimization_cycles" not in text and "privacy_budget_remaining" not in text
