"""Constitutional validation (POST /v1/validate): two lanes of evidence, Rego decides.

The fast lane, the pattern detectors, gives violations; the semantic lane (semantic.py) gives a score
per harm category, and runs only when the patterns found nothing (a violation denies anyway). Both go
to the `content_validation` rule, which has the last word: it denies on any violation, a hash
mismatch, or a category score at its threshold (`semantic:<category>:...` reasons). A category the
policy denied on becomes the violation `harmful:<category>`.

The compliance score starts at 1.0 and loses a fixed weight per distinct violation (harmful content
weighs most, a hash mismatch voids it); any violation therefore lands below the 0.95 threshold.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from ray_app.governance.detectors import detect
from ray_app.governance.policy import PolicyEngine
from ray_app.governance.semantic import SemanticLane

WEIGHTS = {"harmful": 0.5, "bias": 0.3, "pii_leak": 0.2, "constitutional_hash_mismatch": 1.0}


def compliance_score(violations: list[str]) -> float:
    penalty = sum(WEIGHTS.get(v.split(":", 1)[0], 0.2) for v in violations)
    return round(max(0.0, 1.0 - penalty), 4)


class Validator:
    """`semantic`: True for the packaged semantic lane (its model loads on first use), False for patterns only,
    or a SemanticLane of one's own."""

    def __init__(self, engine: PolicyEngine, *, constitutional_hash: str, min_compliance: float = 0.95,
                 semantic: bool | SemanticLane = True):
        self.engine = engine
        self.constitutional_hash = constitutional_hash
        self.min_compliance = min_compliance
        self.semantic = SemanticLane() if semantic is True else semantic or None

    def validate(self, content: str, context: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """{"allow", "compliance_score", "violations", "constitutional_hash", "reasons", "lane", "categories"}.

        `context["constitutional_hash"]`, when given, must match ours. `categories`: the semantic lane's
        score per category; {} where it did not run (off, or the patterns or the hash already deny).
        """
        context = dict(context or {})
        violations = detect(content) if isinstance(content, str) else ["invalid_content"]
        claimed = context.get("constitutional_hash")
        mismatch = ["constitutional_hash_mismatch"] if claimed is not None and claimed != self.constitutional_hash \
            else []
        # Only where it can change the verdict: a violation already denies, and MiniLM costs milliseconds
        # where the rest costs microseconds.
        needed = self.semantic is not None and not violations and not mismatch
        categories = self.semantic.scores(content) if needed else {}
        decision = self.engine.decide("content_validation", {
            "constitutional_hash": self.constitutional_hash if claimed is None else claimed,
            "violations": violations,
            "compliance_score": compliance_score(violations + mismatch),
            "min_compliance": self.min_compliance,
            "categories": categories,
            "context": _plain(context),
        })
        violations = violations + _semantic_violations(decision.reasons) + mismatch
        return {"allow": decision.allow, "compliance_score": compliance_score(violations), "violations": violations,
                "constitutional_hash": self.constitutional_hash, "reasons": decision.reasons,
                "lane": decision.lane, "categories": categories}

    def validate_record(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Validate the assistant answer of a log record: its text and its tool-call arguments."""
        context = {k: record[k] for k in ("constitutional_hash", "workload_type", "workload_id", "client_id")
                   if record.get(k) is not None}
        return self.validate(answer_text(record), context)


def _semantic_violations(reasons: list[str]) -> list[str]:
    """`harmful:<category>` for each `semantic:<category>:<score>>=<threshold>` reason of the policy."""
    return sorted({f"harmful:{r.split(':')[1]}" for r in reasons if r.startswith("semantic:")})


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
