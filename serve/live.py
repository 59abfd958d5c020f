"""A served model keeps proving itself: agreement with the upstream on live calls, and the rollback rule.

Every call both sides answered (shadow, and live's mirrored sample) is scored as the offline evaluation
scores (evals/metrics.py): for tool calls, whether the model called the upstream's functions (the
headline, as `function_name_accuracy`) and whether the whole calls match; for text, the embedding
cosine. The score is stored with the call (`shadow.agreement`), so the window is read back from the
log store and every ingress replica sees the same one.

A window is the last `gateway.window_size` calls that involved the model on its workload. As calls are
stored (at most once a second), once the window holds `gateway.min_window` of them, a replica asks the
constitution's `rollback` rule (beside `promotion`) with the window's agreement and its confidence
interval, the model's error rate and p99 latency: a `false` allow sends the route back to the upstream
at once, the model to `rolled_back` with the reasons, an audit entry and a metric.

The way up, with `gateway.auto_promote`: a model in `shadow` whose window of shadow calls is full and
whose agreement's lower bound clears the threshold moves to `canary` (`gateway.canary_weight`), and
from `canary`, on a full window of canary calls (the model's answers, a share mirrored upstream and
scored), to `live`; each step asks the `promotion` rule (serve/deployer.py) and is audited. Route
changes are atomic (`replace_route`): replicas judging the same window at once change it once.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

from evals.metrics import calls_match, mean_interval, wilson_interval
from evals.prompts import render_tool_calls, text_of
from ray_app.errors import Conflict, PolicyDenied
from ray_app.governance.audit import ROLLBACK, ROUTE_CHANGE
from ray_app.governance.policy import PolicyEngine
from ray_app.registry import ModelState, get_model, set_state
from ray_app.routes import Route, get_route, replace_route
from ray_app.storage.base import LogStore
from serve.deployer import change_route, undeploy

log = logging.getLogger("flywheel.gateway")

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


def _involves(record: dict[str, Any], model: str) -> dict[str, Any] | None:
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
        part = _involves(record, model)
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


def rollback_decision(policies: PolicyEngine, stats: dict[str, Any], *, threshold: float, min_window: int,
                      max_error_rate: float, max_p99_ms: float | None) -> dict[str, Any]:
    """The `rollback` rule on a window: allow (the model keeps its route) or the reasons to take it off."""
    live = {k: v for k, v in stats.items() if v is not None}
    if stats["ci"] is not None:
        live["lower"], live["upper"] = stats["ci"]
    bounds = {"threshold": threshold, "min_window": min_window, "max_error_rate": max_error_rate}
    if max_p99_ms is not None:
        bounds["max_p99_ms"] = max_p99_ms
    return policies.decide("rollback", {"constitutional_hash": policies.constitutional_hash, "live": live,
                                        **bounds}).model_dump()


class LiveWatch:
    """Judges a served model's window as its calls are stored: at most once a second per model and replica
    (the window is read from the store, so what every replica stored counts)."""

    EVERY_S = 1.0

    def __init__(self, gateway: Any):
        self.gateway = gateway  # serve/gateway.py: its settings, stores, policies, metrics and audit
        self.judged: dict[tuple[str, str, str], float] = {}
        self.denied: set[tuple[str, float]] = set()  # (model, route version) whose promotion was denied

    def stored(self, records: list[dict[str, Any]]) -> None:
        """After a batch of gateway calls is stored (the log writer's thread): judge the models they involve."""
        due = set()
        for record in records:
            model = (record.get("route") or {}).get("model")
            if model is not None and _involves(record, model) is not None:
                due.add((model, record["workload_id"], record["client_id"]))
        now = time.monotonic()
        for key in due:
            if now - self.judged.get(key, -self.EVERY_S) >= self.EVERY_S:
                self.judged[key] = now
                self.judge(*key)

    def judge(self, model: str, workload_id: str, client_id: str) -> dict[str, Any] | None:
        """The rollback rule on the model's window; rolls the route back when it says so. The decision, or None."""
        g, cfg = self.gateway, self.gateway.settings.gateway
        stats = live_stats(g.logs, model, workload_id, client_id, window=cfg.window_size)
        if stats["agreement"] is not None:
            g.metrics.live_agreement.labels(workload_id, model).set(stats["agreement"])
        if stats["attempts"] < cfg.min_window:
            return None
        threshold = g.settings.threshold_for(get_model(g.jobs, model)["workload_type"])
        decision = rollback_decision(g.policies, stats, threshold=threshold, min_window=cfg.min_window,
                                     max_error_rate=cfg.max_error_rate, max_p99_ms=cfg.max_p99_ms)
        if not decision["allow"]:
            self._roll_back(model, workload_id, client_id, decision, stats)
        elif cfg.auto_promote:
            self._advance(model, workload_id, client_id, threshold)
        return decision

    def _advance(self, model: str, workload_id: str, client_id: str, threshold: float) -> None:
        """shadow -> canary -> live, once a full window in the current mode clears the threshold."""
        g, cfg = self.gateway, self.gateway.settings.gateway
        route = get_route(g.jobs, workload_id, client_id)
        if route.model != model or route.mode not in ("shadow", "canary") or (model, route.updated_at) in self.denied:
            return
        stats = live_stats(g.logs, model, workload_id, client_id, window=cfg.window_size, since=route.updated_at,
                           mode=route.mode)
        if stats["attempts"] < cfg.window_size or stats["ci"] is None or stats["ci"][0] < threshold:
            return
        up = Route(workload_id=workload_id, client_id=client_id, model=model,
                   **({"mode": "canary", "weight": cfg.canary_weight} if route.mode == "shadow" else {"mode": "live"}))
        entry = {**up.model_dump(mode="json"), "actor_role": "auto_promote", "live": stats}
        try:
            result = change_route(g.settings, g.jobs, g.policies, up, expected=route)
        except Conflict:
            return  # another replica moved it first
        except PolicyDenied as exc:
            self.denied.add((model, route.updated_at))  # asked again only once the route changes
            g.audit.record(ROUTE_CHANGE, {**entry, "decision": exc.details.get("decision")}, outcome="denied")
            return
        g.routes.forget(workload_id, client_id)
        g.audit.record(ROUTE_CHANGE, {**entry, "previous": result["previous"], "decision": result["decision"]})
        log.warning("%s promoted to %s on %s/%s: agreement %s, ci %s over %s calls", model, up.mode, workload_id,
                    client_id, stats["agreement"], stats["ci"], stats["attempts"])

    def _roll_back(self, model: str, workload_id: str, client_id: str, decision: dict[str, Any],
                   stats: dict[str, Any]) -> None:
        g = self.gateway
        route = get_route(g.jobs, workload_id, client_id)
        if route.model != model or route.mode == "off":
            return  # moved on meanwhile
        if not replace_route(g.jobs, route, Route(workload_id=workload_id, client_id=client_id)):
            return  # another replica rolled it back (or moved it) first
        reason = "rollback: " + ", ".join(decision["reasons"])
        set_state(g.jobs, model, ModelState.ROLLED_BACK, reason=reason)
        g.routes.forget(workload_id, client_id)
        g.metrics.rollbacks.labels(workload_id, model).inc()
        g.audit.record(ROLLBACK, {"workload_id": workload_id, "client_id": client_id, "model": model,
                                  "mode": route.mode, "decision": decision, "live": stats}, outcome="rolled_back")
        log.warning("%s rolled back on %s/%s: %s", model, workload_id, client_id, reason)
        undeploy(model)
