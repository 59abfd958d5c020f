"""Constitutional validation (POST /v1/validate): detectors give violations and a score, Rego decides.

The compliance score starts at 1.0 and loses a fixed weight per distinct violation (harmful content
weighs most, a hash mismatch voids it); any violation therefore lands below the 0.95 threshold,
and the `content_validation` rule has the last word (it also denies on a hash mismatch).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from ray_app.governance.detectors import detect
from ray_app.governance.policy import PolicyEngine

WEIGHTS = {"harmful": 0.5, "bias": 0.3, "pii_leak": 0.2, "constitutional_hash_mismatch": 1.0}


def compliance_score(violations: list[str]) -> float:
    penalty = sum(WEIGHTS.get(v.split(":", 1)[0], 0.2) for v in violations)
    return round(max(0.0, 1.0 - penalty), 4)


class Validator:
    def __init__(self, engine: PolicyEngine, *, constitutional_hash: str, min_compliance: float = 0.95):
        self.engine = engine
        self.constitutional_hash = constitutional_hash
        self.min_compliance = min_compliance

    def validate(self, content: str, context: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """{"allow", "compliance_score", "violations", "constitutional_hash", "reasons", "lane"}.

        `context["constitutional_hash"]`, when given, must match ours.
        """
        context = dict(context or {})
        violations = detect(content) if isinstance(content, str) else ["invalid_content"]
        claimed = context.get("constitutional_hash")
        if claimed is not None and claimed != self.constitutional_hash:
            violations.append("constitutional_hash_mismatch")
        score = compliance_score(violations)
        decision = self.engine.decide("content_validation", {
            "constitutional_hash": self.constitutional_hash if claimed is None else claimed,
            "violations": [v for v in violations if v != "constitutional_hash_mismatch"],
            "compliance_score": score,
            "min_compliance": self.min_compliance,
            "context": _plain(context),
        })
        return {"allow": decision.allow, "compliance_score": score, "violations": violations,
                "constitutional_hash": self.constitutional_hash, "reasons": decision.reasons,
                "lane": decision.lane}

    def validate_record(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Validate the assistant answer of a log record: its text and its tool-call arguments."""
        context = {k: record[k] for k in ("constitutional_hash", "workload_type", "workload_id", "client_id")
                   if record.get(k) is not None}
        return self.validate(answer_text(record), context)


def answer_text(record: Mapping[str, Any]) -> str:
    """The assistant message of choices[0] as one text: content (or its text parts) and tool calls."""
    choices = (record.get("response") or {}).get("choices") or [{}]
    message = (choices[0] or {}).get("message") or {}
    content = message.get("content")
    pieces: list[str] = []
    if isinstance(content, str):
        pieces.append(content)
    elif isinstance(content, list):
        pieces.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    for call in message.get("tool_calls") or []:
        fn = (call or {}).get("function") or {}
        args = fn.get("arguments")
        pieces.append(f"{fn.get('name', '')}({args if isinstance(args, str) else _dumps(args)})")
    return "\n".join(pieces)


def _dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return str(value)


def _plain(value: Any) -> Any:
    """Context goes into Rego: keep it JSON-shaped (regorus accepts only plain values)."""
    try:
        return orjson.loads(orjson.dumps(value))
    except TypeError:
        return {}
