"""A served model's live calls scored as the offline evaluation scores them (evals/metrics.py).

Every call both sides answered (shadow, and the mirrored sample in canary and live) is scored: for
tool calls, whether the model called the upstream's functions (the headline, as
`function_name_accuracy`) and whether the whole calls match; for text, the embedding cosine. The
score is stored with the call (`shadow.agreement`), so a window is read back from the log store:
`live_stats` is what every ingress replica (serve/live.py) and the job's report (train/report.py)
see, the same numbers.
"""
from __future__ import annotations

import math
from typing import Any

from evals.metrics import calls_match, mean_interval, wilson_interval
from evals.prompts import render_tool_calls, text_of
from ray_app.storage.base import LogStore

SCAN = 5  # records read per window slot: a canary's upstream-only calls sit between the model's


def _message(answer: dict[str, Any] | None) -> dict[str, Any]:
    return ((answer or {}).get("choices") or [{}])[0].get("message") or {}


def agreement(model_answer: dict[str, Any], upstream_answer: dict[str, Any]) -> dict[str, float]:
    """One call's agreement: {"name", "args"} (0/1) when the upstream called tools, else {"similarity"}."""
    model, upstream = _message(model_answer), _message(upstream_answer)
    if upstream.get("tool_calls"):
        said = render_tool_calls(model["tool_calls"]) if model.get("tool_calls") else text_of(model.get("content"))
        name, args = calls_match(said, [c.get("function", c) for c in upstream["tool_calls"]])
        return {"name": float(name), "args": float(args)}
    from ray_app.embeddings import embed

    a, b = text_of(model.get("content")) or " ", text_of(upstream.get("content")) or " "
    vectors = embed([a, b])
    return {"similarity": round(float(vectors[0] @ vectors[1]), 4)}


def headline(score: dict[str, float]) -> float:
    return score["name"] if "name" in score else score["similarity"]


def involvement(record: dict[str, Any], model: str) -> dict[str, Any] | None:
    """What the model did in this call: its latency, whether it failed, its agreement; None: not there."""
    side = record.get("shadow") or {}
    if record.get("served_by") == model:
        return {"latency_ms": (record.get("performance_metrics") or {}).get("latency_ms"), "failed": False,
                "agreement": side.get("agreement")}
    if record.get("fallback_from") == model:
        return {"latency_ms": None, "failed": True, "agreement": None}
    if side.get("served_by") == model and not side.get("skipped"):
        return {"latency_ms": side.get("latency_ms"), "failed": "error" in side, "agreement": side.get("agreement")}
    return None


def live_stats(logs: LogStore, model: str, workload_id: str, client_id: str, *, window: int,
               since: float | None = None, mode: str | None = None) -> dict[str, Any]:
    """The model's last `window` calls on its workload (only those after `since` under route `mode`, when
    given): {"agreement", "ci", "n", "attempts", "error_rate", "p99_ms", "window"} (agreement None until a
    call was compared)."""
    seen = []
    for record in logs.query(workload_id=workload_id, client_id=client_id, limit=window * SCAN):
        if since is not None and (record.get("timestamp") or 0.0) < since:
            break  # newest first: the rest is older still
        if mode is not None and (record.get("route") or {}).get("mode") != mode:
            continue
        part = involvement(record, model)
        if part is not None:
            seen.append(part)
            if len(seen) == window:
                break
    scores = [headline(p["agreement"]) for p in seen if p["agreement"]]
    latencies = sorted(p["latency_ms"] for p in seen if p["latency_ms"] is not None)
    if not scores:
        mean, ci = None, None
    elif all(s in (0.0, 1.0) for s in scores):
        mean, ci = sum(scores) / len(scores), wilson_interval(int(sum(scores)), len(scores))
    else:
        mean, ci = sum(scores) / len(scores), mean_interval(scores)
    return {"agreement": None if mean is None else round(mean, 4),
            "ci": None if ci is None else [round(ci[0], 4), round(ci[1], 4)], "n": len(scores),
            "attempts": len(seen), "error_rate": round(sum(p["failed"] for p in seen) / len(seen), 4) if seen else 0.0,
            "p99_ms": latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)] if latencies else None,
            "window": window}
