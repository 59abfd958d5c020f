# Constitutional policies for the Flywheel (facts from the ACGS-1 Lite guide: hash, thresholds,
# DP limits, 7-year audit retention, fast/slow governance lanes).
#
# Every rule the engine is asked for is an object {"allow", "reasons", "lane"}. Reasons are
# collected with `not <condition>`, so a missing or mistyped input field is itself a reason:
# the policy fails closed by construction.
package acgs.nemo.constitutional

import rego.v1

cfg := data.acgs.config

hash_ok if input.constitutional_hash == cfg.constitutional_hash

# ---- content validation (POST /v1/validate) ---------------------------------------------------

content_reasons contains "constitutional_hash_mismatch" if not hash_ok

content_reasons contains sprintf("violation:%s", [v]) if some v in input.violations

content_reasons contains "violations_missing" if not is_array(input.violations)

content_reasons contains sprintf("compliance_below_threshold:%v<%v", [input.compliance_score, min_compliance]) if {
	input.compliance_score < min_compliance
}

content_reasons contains "compliance_score_missing" if not is_number(input.compliance_score)

min_compliance := max([cfg.min_compliance, object.get(input, "min_compliance", 0)])

# The semantic lane's scores per category (violence, weapons, self_harm, illegal, hate, exfiltration):
# one at or above its threshold denies, naming the category. No scores (the lane off) is an empty object.
content_reasons contains sprintf("semantic:%s:%v>=%v", [category, score, threshold]) if {
	some category, score in object.get(input, "categories", {})
	threshold := cfg.semantic_thresholds[category]
	score >= threshold
}

content_reasons contains "categories_malformed" if not is_object(object.get(input, "categories", {}))

# Harmful content goes to a human (slow lane); everything else is decided automatically.
content_lane := "slow" if {
	some v in input.violations
	startswith(v, "harmful:")
} else := "slow" if {
	some r in content_reasons
	startswith(r, "semantic:")
} else := "fast"

content_validation := {"allow": count(content_reasons) == 0, "reasons": sort(content_reasons), "lane": content_lane}

# ---- model inference ---------------------------------------------------------------------------

inference_reasons contains "constitutional_hash_mismatch" if not input.model.constitutional_hash == cfg.constitutional_hash

inference_reasons contains "model_compliance_below_threshold" if not input.model.compliance_score >= cfg.min_compliance

inference_reasons contains "request_not_safety_validated" if not input.request.safety_validated == true

inference_reasons contains sprintf("violation:%s", [v]) if some v in object.get(input, ["content", "violations"], [])

inference_reasons contains r if some r in audit_reasons

inference_reasons contains r if some r in quota_reasons

model_inference := {"allow": count(inference_reasons) == 0, "reasons": sort(inference_reasons), "lane": "fast"}

# ---- fine-tuning approval (before training starts) -------------------------------------------

tuning_reasons contains "constitutional_hash_mismatch" if not hash_ok

tuning_reasons contains "differential_privacy_disabled" if not input.training.differential_privacy_enabled == true

tuning_reasons contains sprintf("epsilon_above_limit:%v>%v", [input.training.epsilon, cfg.max_epsilon]) if {
	input.training.epsilon > cfg.max_epsilon
}

tuning_reasons contains "epsilon_missing" if not is_number(input.training.epsilon)

tuning_reasons contains sprintf("delta_above_limit:%v>%v", [input.training.delta, cfg.max_delta]) if {
	input.training.delta > cfg.max_delta
}

tuning_reasons contains "delta_missing" if not is_number(input.training.delta)

tuning_reasons contains sprintf("privacy_budget_exhausted:%v<%v", [input.privacy.budget_remaining, input.training.epsilon]) if {
	is_number(input.privacy.budget_remaining)
	input.privacy.budget_remaining < input.training.epsilon
}

tuning_reasons contains "pii_not_scrubbed" if not input.data.pii_scrubbed == true

tuning_reasons contains r if some r in audit_reasons

tuning_reasons contains r if some r in quota_reasons

tuning_reasons contains r if some r in oversight_reasons

model_fine_tuning := {"allow": count(tuning_reasons) == 0, "reasons": sort(tuning_reasons), "lane": lane}

# ---- promotion of a recommended model ---------------------------------------------------------

promotion_reasons contains "constitutional_hash_mismatch" if not hash_ok

promotion_reasons contains sprintf("accuracy_below_threshold:%v<%v", [input.recommendation.accuracy_ratio, input.threshold]) if {
	input.recommendation.accuracy_ratio < input.threshold
}

promotion_reasons contains "accuracy_ratio_missing" if not is_number(input.recommendation.accuracy_ratio)

promotion_reasons contains "threshold_missing" if not is_number(input.threshold)

promotion_reasons contains sprintf("compliance_below_threshold:%v<%v", [input.recommendation.compliance_rate, min_compliance]) if {
	input.recommendation.compliance_rate < min_compliance
}

promotion_reasons contains "compliance_missing" if not is_number(input.recommendation.compliance_rate)

promotion_reasons contains "pii_not_scrubbed" if not input.data.pii_scrubbed == true

# A fine-tuned candidate must have been trained with DP inside the limits.
customized if input.recommendation.eval_type == "customized"

promotion_reasons contains "training_without_differential_privacy" if {
	customized
	not is_number(input.training.epsilon)
}

promotion_reasons contains sprintf("epsilon_above_limit:%v>%v", [input.training.epsilon, cfg.max_epsilon]) if {
	customized
	input.training.epsilon > cfg.max_epsilon
}

promotion_reasons contains sprintf("delta_above_limit:%v>%v", [input.training.delta, cfg.max_delta]) if {
	customized
	not input.training.delta <= cfg.max_delta
}

# Close calls (within the margin of a threshold) are promoted only after a human looks.
promotion_lane := "slow" if {
	input.recommendation.accuracy_ratio < input.threshold + cfg.review_margin
} else := "slow" if {
	input.recommendation.compliance_rate < min_compliance + cfg.review_margin
} else := "fast"

promotion := {"allow": count(promotion_reasons) == 0, "reasons": sort(promotion_reasons), "lane": promotion_lane}

# ---- rollback of a served model (asked after each live window, serve/live.py) ------------------
# allow: the model keeps its route; reasons: why it goes back to the upstream. Only a full enough
# window can judge, and only when even its upper confidence bound is below the threshold.

rollback_reasons contains "constitutional_hash_mismatch" if not hash_ok

rollback_reasons contains sprintf("agreement_below_threshold:%v<%v", [input.live.upper, input.threshold]) if {
	input.live.n >= input.min_window
	input.live.upper < input.threshold
}

rollback_reasons contains sprintf("error_rate_above_bound:%v>%v", [input.live.error_rate, input.max_error_rate]) if {
	input.live.attempts >= input.min_window
	input.live.error_rate > input.max_error_rate
}

rollback_reasons contains sprintf("p99_latency_above_bound:%v>%v", [input.live.p99_ms, input.max_p99_ms]) if {
	input.live.attempts >= input.min_window
	input.live.p99_ms > input.max_p99_ms
}

rollback := {"allow": count(rollback_reasons) == 0, "reasons": sort(rollback_reasons), "lane": "fast"}

# ---- shared requirements -----------------------------------------------------------------------

audit_reasons contains "audit_trail_disabled" if not input.audit.trail_enabled == true

audit_reasons contains "audit_hash_mismatch" if not input.audit.constitutional_hash == cfg.constitutional_hash

audit_reasons contains sprintf("audit_retention_too_short:%v<%v", [input.audit.retention_days, cfg.min_retention_days]) if {
	input.audit.retention_days < cfg.min_retention_days
}

audit_reasons contains "audit_retention_missing" if not is_number(input.audit.retention_days)

quota := object.get(cfg.quotas, object.get(input, ["user", "id"], "default"), cfg.quotas["default"])

quota_reasons contains sprintf("gpu_hours_over_quota:%v>%v", [input.resources.gpu_hours, quota.gpu_hours]) if {
	input.resources.gpu_hours > quota.gpu_hours
}

quota_reasons contains sprintf("gpus_over_quota:%v>%v", [input.resources.requested_gpus, quota.max_gpus]) if {
	input.resources.requested_gpus > quota.max_gpus
}

quota_reasons contains sprintf("memory_over_quota:%v>%v", [input.resources.memory_gb, quota.memory_gb]) if {
	input.resources.memory_gb > quota.memory_gb
}

# Governance lanes: the fast lane needs no human; the slow lane needs a reviewer assigned.
human_review_required if input.approval.human_review_required == true

lane := "slow" if human_review_required else := "fast"

oversight_reasons contains "monitoring_disabled" if not input.monitoring.constitutional_compliance == true

oversight_reasons contains "human_reviewer_not_assigned" if {
	human_review_required
	not input.approval.human_reviewer_assigned == true
}
