"""Governance inside the flywheel job: compliant data, compliant outputs, approved training, gated promotion.

Everything here is built from the Settings in the process that uses it, by
`ray_app.governance.from_settings` as the Serve app builds its own: regorus engines are pinned to
the thread that made them and do not pickle, so a Ray task builds its own.

- `record_check(settings)`: the Validator's verdict on a log record's production answer; curation
  keeps only records it allows.
- `output_check(settings)`: the Validator's verdict on a candidate's generated text; this is the
  `compliance_rate` of every evaluation.
- `approve_fine_tuning(...)`: the `model_fine_tuning` rule before a training starts. The constitution
  requires differential privacy (epsilon <= 8, delta <= 1e-5), so `training.privacy.enabled: false`
  is denied: such a job still evaluates base and in-context candidates, but fine-tunes nothing.
  With `privacy.budget_epsilon` set, `privacy_budget(...)` composes the workload's ledger with the
  planned run (ray_app/privacy.py) and the rule also denies a run that would overspend it.
- `record_repair(settings)`: the critique-revision reviser (train/revise.py) curation hands the
  non-compliant records to, when `governance.repair_noncompliant` is on.
- `promote(...)`: the `promotion` rule on the report's recommendation. `promoted` is the rule's
  `allow`; a slow-lane allow (a close call) also sets `review_required`.
Every decision is written to the audit trail, allowed or denied.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ray_app import governance
from ray_app.config import Settings
from ray_app.governance.audit import POLICY_DECISION, PROMOTION, AuditLog
from ray_app.governance.policy import Decision
from ray_app.governance.promotion import approve_training, promotion_gate
from ray_app.privacy import (
    RecordSet,
    fresh_ids,
    planned_mechanism,
    prospective_epsilon,
    read_ledger,
    record_sets,
)
from ray_app.storage import open_job_store


def record_check(settings: Settings) -> Callable[[dict[str, Any]], bool]:
    check = governance.from_settings(settings).validator
    return lambda record: check.validate_record(record)["allow"]


def output_check(settings: Settings) -> Callable[[str], bool]:
    check = governance.from_settings(settings).validator
    return lambda text: check.validate(text)["allow"]


def record_repair(settings: Settings) -> Callable[[list[dict[str, Any]]], list[dict[str, Any] | None]] | None:
    """The reviser for non-compliant records, or None when `governance.repair_noncompliant` is off."""
    if not settings.governance.repair_noncompliant:
        return None
    from train.revise import record_reviser

    return record_reviser(settings, governance.from_settings(settings).validator)


def privacy_budget(settings: Settings, *, workload_id: str, client_id: str,
                   record_ids: Sequence[str]) -> dict[str, Any] | None:
    """The ledger's view of a run planned on `record_ids`, or None without a budget (or without DP).

    {"budget_epsilon", "spent", "after", "runs", "records", "fresh", "planned": [noise, rate, steps],
    "budget_remaining"}: spent and after per record (ray_app/privacy.py), `fresh` the records no earlier
    run used. The rule denies when `budget_remaining < training.epsilon` (this run's target epsilon), so
    what is handed to it is the budget minus what the history adds to this run: the rule then denies
    exactly when the spend after the run would exceed the budget.
    """
    if not _budgeted(settings):
        return None
    return _budget_view(settings, *_history(settings, workload_id, client_id), record_ids)


def within_budget(settings: Settings, *, workload_id: str, client_id: str,
                  records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The training records to use and their budget view: all of them when they fit; when they would
    overspend, only the ones no earlier run trained on, if those fit (`limited_to_fresh` in the view);
    else all of them, for the policy to refuse with the reason. The ledger is read once."""
    if not _budgeted(settings):
        return records, None
    ledger, sets = _history(settings, workload_id, client_id)
    ids = [r["id"] for r in records]
    budget = _budget_view(settings, ledger, sets, ids)
    if not budget_note(budget) or not budget["fresh"]:
        return records, budget
    fresh = set(fresh_ids(ids, sets))
    limited = _budget_view(settings, ledger, sets, [i for i in ids if i in fresh])
    if budget_note(limited):
        return records, budget
    return [r for r in records if r["id"] in fresh], {**limited, "limited_to_fresh": True}


def _budgeted(settings: Settings) -> bool:
    privacy = settings.training.privacy
    return privacy.enabled and privacy.budget_epsilon is not None


def _history(settings: Settings, workload_id: str, client_id: str) -> tuple[dict[str, Any], list[RecordSet]]:
    store = open_job_store(settings)
    ledger = read_ledger(store, workload_id, client_id)
    return ledger, record_sets(store, ledger)


def _budget_view(settings: Settings, ledger: dict[str, Any], sets: list[RecordSet],
                 record_ids: Sequence[str]) -> dict[str, Any] | None:
    training, privacy = settings.training, settings.training.privacy
    try:
        planned = planned_mechanism(num_examples=len(record_ids), batch_size=training.batch_size,
                                    epochs=training.epochs, max_steps=training.max_steps,
                                    target_epsilon=privacy.target_epsilon, delta=privacy.delta)
    except ValueError:  # an epsilon no noise reaches: the run is refused on its own (train/dp.py), spending nothing
        return None
    spent, after = prospective_epsilon(ledger, sets, planned, record_ids, delta=privacy.delta)
    return {"budget_epsilon": privacy.budget_epsilon, "spent": spent, "after": after,
            "runs": len(ledger["runs"]), "records": len(record_ids), "fresh": len(fresh_ids(record_ids, sets)),
            "planned": list(planned), "budget_remaining": privacy.budget_epsilon - (after - privacy.target_epsilon)}


def budget_note(budget: dict[str, Any] | None) -> str:
    """Why the budget refuses, in words, or "" when it does not."""
    if not budget or budget["after"] <= budget["budget_epsilon"]:
        return ""
    return (f"; composed epsilon would be {budget['after']:.3f} > privacy.budget_epsilon "
            f"{budget['budget_epsilon']} (spent {budget['spent']:.3f} over {budget['runs']} earlier runs; "
            f"{budget['fresh']} of the {budget['records']} training records unused by them)")


def _decision(decision: Decision) -> dict[str, Any]:
    return decision.model_dump(mode="json")


def approve_fine_tuning(settings: Settings, audit: AuditLog, *, job_id: str, workload_id: str, client_id: str,
                        model: str, budget: dict[str, Any] | None = None) -> Decision:
    """The policy's verdict on fine-tuning `model` with the job's privacy settings; audited either way.

    `budget`: `privacy_budget(...)`'s result, when a privacy budget is configured.
    """
    training = settings.training
    privacy = training.privacy.model_dump()
    resources = {"requested_gpus": training.num_workers if training.use_gpu else 0}
    remaining = None if budget is None else budget["budget_remaining"]
    policies = governance.from_settings(settings).policies
    decision = approve_training(policies, privacy=privacy, pii_scrubbed=True, resources=resources,
                                budget_remaining=remaining,
                                audit_retention_days=settings.governance.audit_retention_days,
                                client_id=client_id)
    audit.record(POLICY_DECISION, {
        "job_id": job_id, "workload_id": workload_id, "client_id": client_id, "model": model,
        "decision": _decision(decision),
        "inputs": {"privacy": {k: privacy[k] for k in ("enabled", "target_epsilon", "delta")},
                   "pii_scrubbed": True, "resources": resources, "privacy_budget": budget},
    }, outcome="allowed" if decision.allow else "denied")
    return decision


def denial_reason(decision: Decision) -> str:
    return f"denied by policy {decision.rule}: {', '.join(decision.reasons) or 'no reason given'}"


def _recommended_run(report: dict[str, Any], rec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The recommended run's scores and training: a sweep trial's own, or the candidate's."""
    if rec.get("trial"):
        trial = next(t for t in report["sweep"]["trials"] if t["trial"] == rec["trial"])
        return trial["scores"] or {}, trial["training"]
    cand = next(c for c in report["candidates"] if c["model"] == rec["model"])
    scores = cand["evaluations"][rec["eval_type"]] or {}
    return scores, cand["training"] if rec["eval_type"] == "customized" else None


def promote(settings: Settings, audit: AuditLog, report: dict[str, Any]) -> dict[str, Any]:
    """Run the promotion gate on the report's recommendation; sets `promoted` and `policy_decision` in place."""
    rec = report["recommendation"]
    workload_type = report["workload_type"]
    threshold = settings.threshold_for(workload_type)
    inputs: dict[str, Any] = {"threshold": threshold, "min_compliance": settings.governance.min_compliance,
                              "pii_scrubbed": True}
    if rec.get("model") is None:
        # Nothing to promote: the gate is not asked, and the reason is the recommendation's own.
        decision = {"allow": False, "reasons": [f"no_recommendation: {rec.get('reason')}"], "lane": None,
                    "rule": "promotion", "constitutional_hash": settings.governance.constitutional_hash}
    else:
        scores, training = _recommended_run(report, rec)
        rec["compliance_rate"] = scores.get("compliance_rate")
        inputs.update(recommendation={k: rec.get(k) for k in ("model", "eval_type", "accuracy_ratio",
                                                               "compliance_rate")},
                      training=training)
        decision = _decision(promotion_gate(
            governance.from_settings(settings).policies, recommendation=inputs["recommendation"], training=training,
            threshold=threshold, min_compliance=settings.governance.min_compliance, pii_scrubbed=True))
    rec["promoted"] = bool(decision["allow"])
    rec["review_required"] = bool(decision["allow"] and decision["lane"] == "slow")
    rec["policy_decision"] = decision
    audit.record(PROMOTION, {"job_id": report["job_id"], "workload_id": report["workload_id"],
                             "client_id": report["client_id"], "model": rec.get("model"),
                             "eval_type": rec.get("eval_type"), "decision": decision, "inputs": inputs},
                 outcome="promoted" if rec["promoted"] else "denied")
    return report
