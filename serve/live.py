"""A served model keeps proving itself: the rollback rule on its live window, and the way up.

Calls are scored and windows read as evals/live.py does it (the offline evaluation's metrics on live
calls, stored with each call), so every ingress replica sees the same window.

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
import time
from typing import Any

from evals.live import involvement, live_stats
from ray_app.errors import Conflict, PolicyDenied
from ray_app.governance.audit import ROLLBACK, ROUTE_CHANGE
from ray_app.governance.policy import PolicyEngine
from ray_app.registry import ModelState, get_model, set_state
from ray_app.routes import Route, get_route, replace_route
from serve.deployer import change_route, undeploy

log = logging.getLogger("flywheel.gateway")

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
            if model is not None and involvement(record, model) is not None:
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
