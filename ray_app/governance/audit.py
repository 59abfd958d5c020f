"""The audit trail: classified, prioritized, sampled and de-duplicated events on a hash chain.

Classification and priority follow the ACGS audit router:
  constitutional_violation (payload carries violations)     -> critical
  model_optimization_trigger (compliance_score < 0.8)       -> high
  human_feedback (event type, or source == "human_review")  -> medium
  policy_evaluation, audit_trail (everything else)          -> low
Routine successes (ingest batches, validations, policy decisions that went through) are kept at
`sample_rate`, decided by SHA-256 of the canonical event so every process and every run keeps the
same ones (never Python's salted hash()). Job stages, trainings and promotions are always kept.
An identical event seen again within the last `dedup_size` events / `dedup_seconds` is dropped.

Payloads are PII-scrubbed before they are written. `verify(store)` recomputes every hash and link.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

from ray_app.governance.pii import scrub_value
from ray_app.storage.base import GENESIS_HASH, AuditStore, entry_hash

# Event types; the routine ones may be sampled when they succeed.
INGEST_BATCH = "ingest_batch"
VALIDATION = "validation"
POLICY_DECISION = "policy_decision"
JOB_STAGE = "job_stage"
TRAINING = "training"
PROMOTION = "promotion"
HUMAN_FEEDBACK = "human_feedback"
ROUTE_CHANGE = "route_change"
ROLLBACK = "rollback"
ROUTINE = frozenset({INGEST_BATCH, VALIDATION, POLICY_DECISION})

PRIORITY = {
    "constitutional_violation": "critical",
    "model_optimization_trigger": "high",
    "human_feedback": "medium",
    "policy_evaluation": "low",
    "audit_trail": "low",
}


def _stable(value: Any, depth: int = 0) -> Any:
    """Floats cut to 12 significant digits, keys made strings.

    The chain hashes the parsed entry, and two 17-digit decimals can parse to the same double: a
    byte changed there would go unseen. With <= 15 digits every decimal is its own double, so any
    changed digit changes the hash.
    """
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if depth > 64:
        return str(value)
    if isinstance(value, dict):
        return {str(k): _stable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_stable(v, depth + 1) for v in value]
    return value


def classify(event_type: str, payload: dict[str, Any]) -> str:
    if payload.get("violations"):
        return "constitutional_violation"
    if event_type == POLICY_DECISION:
        return "policy_evaluation"
    score = payload.get("compliance_score")
    if isinstance(score, int | float) and score < 0.8:
        return "model_optimization_trigger"
    if event_type == HUMAN_FEEDBACK or payload.get("source") == "human_review":
        return "human_feedback"
    return "audit_trail"


def canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)


class AuditLog:
    def __init__(self, store: AuditStore, *, constitutional_hash: str, sample_rate: float = 0.1,
                 dedup_size: int = 4096, dedup_seconds: float = 3600.0):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be within [0, 1], got {sample_rate!r}")
        self.store = store
        self.constitutional_hash = constitutional_hash
        self.sample_rate = sample_rate
        self.dedup_size = dedup_size
        self.dedup_seconds = dedup_seconds
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, event_type: str, payload: dict[str, Any], *, outcome: str = "success") -> dict[str, Any] | None:
        """Append the event and return the stored entry, or None if it was sampled out or a duplicate."""
        # Duplicates are judged on the event as given (two users' emails are not the same event),
        # but only that in-memory digest sees the raw payload: what is stored is scrubbed.
        raw_digest = hashlib.sha256(canonical({"type": event_type, "outcome": outcome, "payload": payload})).digest()
        payload = _stable(scrub_value(payload))
        classification = classify(event_type, payload)
        digest = hashlib.sha256(canonical({"type": event_type, "outcome": outcome, "payload": payload})).hexdigest()
        if not self._keep(event_type, classification, outcome, digest) or self._duplicate(raw_digest):
            return None
        return self.store.append({
            "type": event_type,
            "classification": classification,
            "priority": PRIORITY[classification],
            "outcome": outcome,
            "payload": payload,
            "digest": digest,
            "constitutional_hash": self.constitutional_hash,
            "ts_ms": time.time_ns() // 1_000_000,
        })

    def _keep(self, event_type: str, classification: str, outcome: str, digest: str) -> bool:
        routine = event_type in ROUTINE and outcome == "success" and PRIORITY[classification] == "low"
        return not routine or int(digest[:16], 16) / 2**64 < self.sample_rate

    def _duplicate(self, digest: bytes) -> bool:
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(digest)
            if seen is not None and now - seen < self.dedup_seconds:
                return True
            self._seen[digest] = now
            self._seen.move_to_end(digest)
            while len(self._seen) > self.dedup_size:
                self._seen.popitem(last=False)
        return False

    def head(self) -> dict[str, Any] | None:
        """{"seq", "hash"} of the last entry: keep it elsewhere as an anchor against truncation."""
        last = None
        for entry in self.store.entries():
            last = entry
        return None if last is None else {"seq": last["seq"], "hash": last["hash"]}


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    first_bad_seq: int | None = None
    reason: str = ""


def verify(store: AuditStore, *, anchor: dict[str, Any] | None = None) -> VerifyResult:
    """Walk the chain: seq 0, 1, 2...; every prev_hash links to the entry before; every hash recomputes.

    A chain cannot show that entries were cut off its end; pass `anchor` (a head() kept elsewhere)
    to check that too.
    """
    prev_hash, expected, count = GENESIS_HASH, 0, 0
    entries = store.entries()
    while True:
        try:
            entry = next(entries)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001 - an unreadable document (a flipped byte breaks the JSON, any way)
            return VerifyResult(False, count, expected, f"entry {expected} is unreadable: {type(exc).__name__}")
        problem = _check(entry, expected, prev_hash)
        if problem:
            return VerifyResult(False, count, expected, problem)
        prev_hash, expected, count = entry["hash"], expected + 1, count + 1
    if anchor is not None and (count <= anchor["seq"] or _hash_at(store, anchor["seq"]) != anchor["hash"]):
        return VerifyResult(False, count, min(count, anchor["seq"]),
                            f"chain does not reach the anchor (seq {anchor['seq']}): entries were removed")
    return VerifyResult(True, count)


def _check(entry: Any, expected: int, prev_hash: str) -> str:
    if not isinstance(entry, dict) or not {"seq", "prev_hash", "event", "hash"} <= entry.keys():
        return f"entry {expected} is malformed"
    if entry["seq"] != expected:
        return f"entry {expected} has seq {entry['seq']!r}: entries were removed, reordered or edited"
    if entry["prev_hash"] != prev_hash:
        return f"entry {expected} does not link to the entry before it"
    try:
        recomputed = entry_hash(entry)
    except TypeError:
        return f"entry {expected} cannot be hashed"
    if recomputed != entry["hash"]:
        return f"entry {expected} was modified (hash mismatch)"
    return ""


def _hash_at(store: AuditStore, seq: int) -> str | None:
    return next((e.get("hash") for e in store.entries(start_seq=seq, limit=1)), None)
