"""Policy gates around training: approve fine-tuning before it starts, promote a model after it is measured.

Both build the Rego input from the flywheel's own shapes (PrivacyConfig dump, report entries) and
return the Decision; callers raise PolicyDenied or record `promoted: false` as they see fit.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray_app.governance.policy import Decision, PolicyEngine

SEVEN_YEARS_DAYS = 2555


def approve_training(engine: PolicyEngine, *, privacy: Mapping[str, Any], pii_scrubbed: bool,
                     budget_remaining: float | None = None, resources: Mapping[str, Any] | None = None,
                     audit_retention_days: int = SEVEN_YEARS_DAYS, human_review_required: bool = False,
                     human_reviewer_assigned: bool = False, client_id: str = "default") -> Decision:
    """Fine-tuning approval: DP on with epsilon <= 8 and delta <= 1e-5, PII scrubbed, audit kept 7 years,
    within quota and privacy budget; the slow lane needs a human reviewer assigned.

    `privacy` is the training.privacy config ({"enabled", "target_epsilon", "delta", ...}).
    """
    training = {"differential_privacy_enabled": bool(privacy.get("enabled")),
                "epsilon": privacy.get("target_epsilon"), "delta": privacy.get("delta")}
    return engine.decide("model_fine_tuning", {
        "constitutional_hash": engine.constitutional_hash,
        "training": {k: v for k, v in training.items() if v is not None},
        "privacy": {} if budget_remaining is None else {"budget_remaining": budget_remaining},
        "data": {"pii_scrubbed": pii_scrubbed},
        "audit": {"trail_enabled": True, "constitutional_hash": engine.constitutional_hash,
                  "retention_days": audit_retention_days},
        "monitoring": {"constitutional_compliance": True},
        "approval": {"human_review_required": human_review_required,
                     "human_reviewer_assigned": human_reviewer_assigned},
        "resources": dict(resources or {}),
        "user": {"id": client_id},
    })


def promotion_gate(engine: PolicyEngine, *, recommendation: Mapping[str, Any], training: Mapping[str, Any] | None,
                   threshold: float, min_compliance: float, pii_scrubbed: bool) -> Decision:
    """Promote only if accuracy_ratio >= threshold, compliance_rate >= min_compliance (never below 0.95),
    PII was scrubbed, and a customized model was trained within the DP limits.

    `recommendation`: {"model", "eval_type", "accuracy_ratio", "compliance_rate", ...};
    `training`: the candidate's report entry {"epsilon", "delta", ...} (None for base/icl).
    """
    return engine.decide("promotion", {
        "constitutional_hash": engine.constitutional_hash,
        "recommendation": {k: v for k, v in recommendation.items() if v is not None},
        "training": {k: v for k, v in (training or {}).items() if v is not None},
        "threshold": threshold,
        "min_compliance": min_compliance,
        "data": {"pii_scrubbed": pii_scrubbed},
    })
