"""Promotion gate and fine-tuning approval through the Rego rules."""
from __future__ import annotations

import pytest

from ray_app.governance.policy import PolicyEngine
from ray_app.governance.promotion import approve_training, promotion_gate


@pytest.fixture(scope="module")
def engine():
    return PolicyEngine.load()


REC = {"model": "smollm2-135m", "eval_type": "customized", "accuracy_ratio": 0.97, "compliance_rate": 1.0}
TRAINING = {"epsilon": 7.9, "delta": 1e-5, "noise_multiplier": 0.9}


def _gate(engine, rec=None, training=TRAINING, threshold=0.9, min_compliance=0.95, pii=True):
    return promotion_gate(engine, recommendation={**REC, **(rec or {})}, training=training, threshold=threshold,
                          min_compliance=min_compliance, pii_scrubbed=pii)


def test_promotion_allowed(engine):
    d = _gate(engine)
    assert d.allow and d.lane == "fast" and d.rule == "promotion"


@pytest.mark.parametrize("kw,reason", [
    ({"rec": {"accuracy_ratio": 0.85}}, "accuracy_below_threshold:0.85<0.9"),
    ({"threshold": 0.98}, "accuracy_below_threshold:0.97<0.98"),
    ({"rec": {"compliance_rate": 0.9}}, "compliance_below_threshold:0.9<0.95"),
    ({"min_compliance": 0.5, "rec": {"compliance_rate": 0.9}}, "compliance_below_threshold:0.9<0.95"),  # floor
    ({"pii": False}, "pii_not_scrubbed"),
    ({"training": {"epsilon": 12.0, "delta": 1e-5}}, "epsilon_above_limit:12>8"),
    ({"training": {"epsilon": 2.0, "delta": 1e-3}}, "delta_above_limit:0.001>0.00001"),
    ({"training": {"epsilon": None}}, "training_without_differential_privacy"),
])
def test_promotion_denied(engine, kw, reason):
    d = _gate(engine, **kw)
    assert not d.allow and reason in d.reasons, d.reasons


def test_base_and_icl_candidates_need_no_training(engine):
    assert _gate(engine, rec={"eval_type": "icl"}, training=None).allow


def test_close_calls_go_to_the_slow_lane(engine):
    d = _gate(engine, rec={"accuracy_ratio": 0.905})
    assert d.allow and d.lane == "slow"


PRIVACY = {"enabled": True, "target_epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}


def test_training_approved_within_dp_limits(engine):
    d = approve_training(engine, privacy=PRIVACY, pii_scrubbed=True, budget_remaining=20.0)
    assert d.allow and d.lane == "fast", d.reasons


@pytest.mark.parametrize("kw,reason", [
    ({"privacy": {**PRIVACY, "enabled": False}}, "differential_privacy_disabled"),
    ({"privacy": {**PRIVACY, "target_epsilon": 8.5}}, "epsilon_above_limit:8.5>8"),
    ({"privacy": {**PRIVACY, "delta": 1e-4}}, "delta_above_limit:0.0001>0.00001"),
    ({"pii_scrubbed": False}, "pii_not_scrubbed"),
    ({"budget_remaining": 3.0}, "privacy_budget_exhausted:3<8"),
    ({"audit_retention_days": 30}, "audit_retention_too_short:30<2555"),
    ({"resources": {"requested_gpus": 20}}, "gpus_over_quota:20>8"),
    ({"human_review_required": True}, "human_reviewer_not_assigned"),
])
def test_training_denied(engine, kw, reason):
    args = {"privacy": PRIVACY, "pii_scrubbed": True, **kw}
    d = approve_training(engine, **args)
    assert not d.allow and reason in d.reasons, d.reasons


def test_slow_lane_with_reviewer_is_approved(engine):
    d = approve_training(engine, privacy=PRIVACY, pii_scrubbed=True, human_review_required=True,
                         human_reviewer_assigned=True)
    assert d.allow and d.lane == "slow"
