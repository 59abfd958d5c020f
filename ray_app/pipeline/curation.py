"""From a workload's raw logs to clean, de-duplicated examples.

Each curated example is a plain dict (it crosses Ray and lands in JSON files):
    {"id", "record", "workload_type", "tool", "user_text"}
`record` is the stored log record with every tool call's `arguments` parsed into an
object; `tool` is the name of the production answer's first tool call (None for generic
workloads) and drives stratification; `user_text` is the last user turn (used for
semantic in-context example selection).

Only compliant records become examples: `curate(..., compliant=check)` drops every record
whose production answer `check(record)` rejects (the governance Validator's verdict, see
train/gates.py) and counts them as `non_compliant`, so a biased or harmful production answer
is never a training target or an evaluation reference. With `repair=` (the critique-revision
reviser, train/revise.py, when `governance.repair_noncompliant` is on) the non-compliant records
are handed over in one batch instead; a record it returns (answer revised into compliance) is
kept, marked `"revised": true` with its `revision_rounds`, and counted as `repaired`. Repaired
records are de-duplicated after the originally compliant ones, so those win a tie.

The target is always the production model's answer: a gateway call a served candidate answered is
kept only with the upstream's mirrored answer in its place, else counted as `model_answered` and
left out (`production_answered`), so the loop never trains on its own output.
"""
from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from ray_app.errors import InvalidRecord, JobFailed, NotFound
from ray_app.schemas import check_record
from ray_app.storage.base import LogStore


def export_records(store: LogStore, workload_id: str, client_id: str, *, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` records of a workload, oldest first. Unknown workload -> NotFound."""
    total = store.count(workload_id, client_id)
    if total == 0:
        known = ", ".join(f"{w['workload_id']}/{w['client_id']}" for w in store.workloads()[:10]) or "none"
        raise NotFound(f"no records for workload {workload_id!r} of client {client_id!r} (known: {known})",
                       field="workload_id")
    records = list(store.export(workload_id, client_id))
    return records[-limit:]


def workload_type_of(records: Iterable[dict[str, Any]]) -> str:
    """The type most records were stamped with at ingest."""
    counts = Counter(r.get("workload_type") or "generic" for r in records)
    return counts.most_common(1)[0][0] if counts else "generic"


def eval_kind(workload_type: str) -> str:
    """How answers are compared: tool calls by name/arguments, everything else by text similarity."""
    return "tool_calling" if workload_type == "tool_calling" else "generic"


Repair = Callable[[list[dict[str, Any]]], list[dict[str, Any] | None]]


def curate(records: list[dict[str, Any]], *, workload_type: str,
           compliant: Callable[[dict[str, Any]], bool] | None = None,
           repair: Repair | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Validate, filter, check compliance (repairing when given `repair`), parse arguments, de-duplicate.

    Returns (examples, counts of what was dropped; `repaired` counts the revised records kept).
    """
    kind = eval_kind(workload_type)
    stats = Counter(exported=len(records))
    if compliant is not None:
        stats["non_compliant"] = 0  # reported even when nothing was dropped: the check ran
    if compliant is not None and repair is not None:
        stats["repaired"] = 0
    seen: set[tuple[str, ...]] = set()
    examples: list[dict[str, Any]] = []
    to_repair: list[tuple[dict[str, Any], str | None]] = []
    for logged in records:
        raw = production_answered(logged)
        if raw is None:
            stats["model_answered"] += 1
            continue
        try:
            check_record(raw)
        except InvalidRecord:
            stats["invalid"] += 1
            continue
        record = _with_parsed_arguments(raw)
        if record is None:
            stats["unparseable_arguments"] += 1
            continue
        message = record["response"]["choices"][0]["message"]
        tool = None
        if kind == "tool_calling":
            if not message.get("tool_calls"):
                stats["no_tool_call"] += 1
                continue
            tool = message["tool_calls"][0]["function"]["name"]
        elif not _text(message.get("content")).strip():
            stats["empty_answer"] += 1
            continue
        if compliant is not None and not compliant(record):
            if repair is not None:
                to_repair.append((record, tool))
            else:
                stats["non_compliant"] += 1  # before de-duplication: a bad answer must not shadow a good one
            continue
        _keep(record, kind, tool, seen, examples, stats)
    if to_repair:
        revised = repair([record for record, _ in to_repair])
        for (_, tool), record in zip(to_repair, revised, strict=True):
            if record is None:
                stats["non_compliant"] += 1
                continue
            stats["repaired"] += 1
            _keep(record, kind, tool, seen, examples, stats, revised=True)
    stats["kept"] = len(examples)
    return examples, dict(stats)


def production_answered(record: dict[str, Any]) -> dict[str, Any] | None:
    """The record with the production model's answer as its target, or None when only a served
    candidate answered it: a candidate must never learn from its own answers (or an earlier
    candidate's). A gateway call a model answered whose request was mirrored upstream keeps the
    upstream's answer (`shadow.response`); records from outside the gateway carry no `served_by`."""
    served_by = record.get("served_by")
    if served_by in (None, "upstream"):
        return record
    side = record.get("shadow") or {}
    if side.get("served_by") == "upstream" and side.get("response"):
        return {**record, "response": side["response"], "served_by": "upstream"}
    return None


def _keep(record: dict[str, Any], kind: str, tool: str | None, seen: set[tuple[str, ...]],
          examples: list[dict[str, Any]], stats: Counter, *, revised: bool = False) -> None:
    # The same conversation asked again is a duplicate: its user turns, and what the tools already
    # answered (a follow-up after a tool result is a new interaction, though the user said nothing new).
    messages = record["request"]["messages"]
    users = tuple(_text(m.get("content")).strip() for m in messages if m["role"] == "user")
    key = users + tuple(f"{m['role']}:{_text(m.get('content')).strip()}" for m in messages
                        if m["role"] in ("tool", "function"))
    if key in seen:
        stats["duplicates"] += 1
        return
    seen.add(key)
    example = {"id": record["id"], "record": record, "workload_type": kind, "tool": tool,
               "user_text": users[-1] if users else ""}
    if revised:
        example.update(revised=True, revision_rounds=record["revision"]["rounds"])
    examples.append(example)


def require_enough(examples: list[dict[str, Any]], stats: dict[str, int], *, min_total: int) -> None:
    if len(examples) < min_total:
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(stats.items()) if k not in ("kept", "exported") and v)
        raise JobFailed(f"only {len(examples)} usable records after curation, need at least {min_total} "
                        f"(data_split.min_total_records); exported {stats.get('exported', 0)}"
                        + (f", dropped {dropped}" if dropped else ""))


def _with_parsed_arguments(raw: dict[str, Any]) -> dict[str, Any] | None:
    """A copy whose tool-call arguments are objects; None if a string argument is not JSON."""
    record = copy.deepcopy(raw)
    messages = list(record["request"]["messages"]) + [c["message"] for c in record["response"]["choices"]]
    for message in messages:
        for call in message.get("tool_calls") or []:
            args = call["function"].get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    return None
            if not isinstance(args, dict):
                return None
            call["function"]["arguments"] = args
    return record


def _text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""
