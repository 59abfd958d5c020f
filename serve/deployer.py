"""Changing a workload's route: the policy first, then the model's Serve application, then the route.

Moving a model to `canary` or `live` asks the constitution's `promotion` rule with the model's own
offline record (accuracy ratio against the workload's threshold, compliance, the DP it was trained
under): denied, the route stays as it was (PolicyDenied -> 403 with the reasons). `shadow` answers
no caller, so it needs no promotion. A model that will answer gets its Serve application before the
route points at it (`serve.run` from the ingress replica: loading takes seconds, the call waits);
the model the route leaves goes back to `registered` and its application is deleted (a model that
was `live` and is replaced is `retired`).
"""
from __future__ import annotations

from typing import Any

from ray import serve

from ray_app.config import Settings
from ray_app.errors import Conflict, InvalidRecord, PolicyDenied
from ray_app.governance.policy import PolicyEngine
from ray_app.governance.promotion import promotion_gate
from ray_app.registry import ModelState, get_model, set_state
from ray_app.routes import Route, get_route, list_routes, put_route, replace_route
from ray_app.storage.base import JobStore
from serve.model_server import app_name, model_app

NEEDS_PROMOTION = ("canary", "live")


def promotion_decision(settings: Settings, policies: PolicyEngine, model: dict[str, Any]) -> dict[str, Any]:
    scores = model.get("scores") or {}
    decision = promotion_gate(
        policies, recommendation={"model": model["id"], "eval_type": "customized",
                                  "accuracy_ratio": model.get("accuracy_ratio"),
                                  "compliance_rate": scores.get("compliance_rate")},
        training=model.get("privacy"), threshold=settings.threshold_for(model["workload_type"]),
        min_compliance=settings.governance.min_compliance, pii_scrubbed=True)
    return decision.model_dump()


def change_route(settings: Settings, store: JobStore, policies: PolicyEngine, route: Route, *,
                 expected: Route | None = None) -> dict[str, Any]:
    """Apply `route`; {"route", "previous", "decision"}. Raises NotFound, InvalidRecord or PolicyDenied.
    With `expected` (an automatic change: serve/live.py), only in its place: Conflict if it changed meanwhile."""
    if route.mode != "off" and route.model is None:
        raise InvalidRecord(f"mode {route.mode!r} needs a model", field="model")
    previous = expected or get_route(store, route.workload_id, route.client_id)
    decision = None
    if route.model is not None:
        model = get_model(store, route.model)
        if (model["workload_id"], model["client_id"]) != (route.workload_id, route.client_id):
            raise InvalidRecord(f"model {route.model!r} was trained on {model['workload_id']}/{model['client_id']}, "
                                f"not {route.workload_id}/{route.client_id}", field="model")
        if route.mode in NEEDS_PROMOTION:
            decision = promotion_decision(settings, policies, model)
            if not decision["allow"]:
                raise PolicyDenied(f"promotion of {route.model} to {route.mode} denied: "
                                   f"{', '.join(decision['reasons'])}", field="mode", details={"decision": decision})
        if route.mode != "off":
            ensure_deployed(settings, model)
    if expected is None:
        put_route(store, route)
    elif not replace_route(store, expected, route):
        raise Conflict(f"route {route.workload_id}/{route.client_id} changed meanwhile", field="route")
    _settle_states(store, previous, route)
    return {"route": route.model_dump(mode="json"), "previous": previous.model_dump(mode="json"),
            "decision": decision}


def _settle_states(store: JobStore, previous: Route, route: Route) -> None:
    if route.model is not None:
        state = ModelState.REGISTERED if route.mode == "off" else ModelState(route.mode)
        set_state(store, route.model, state, reason=f"route {route.workload_id}/{route.client_id} -> {route.mode}")
    if previous.model is not None and previous.model != route.model:
        left = ModelState.RETIRED if previous.mode == "live" else ModelState.REGISTERED
        set_state(store, previous.model, left, reason=f"replaced by {route.model or 'the upstream'}")
        if not any(r.model == previous.model and r.mode != "off" for r in list_routes(store)):
            undeploy(previous.model)


def ensure_deployed(settings: Settings, model: dict[str, Any]) -> None:
    """Start the model's Serve application unless it runs (returns once it is ready)."""
    name = app_name(model["id"])
    status = serve.status().applications.get(name)
    if status is not None and status.status == "RUNNING":
        return
    serve.run(model_app(settings, model), name=name, route_prefix=None)


def undeploy(model_id: str) -> None:
    if app_name(model_id) in serve.status().applications:
        serve.delete(app_name(model_id), _blocking=False)


def deploy_routed_models(settings: Settings, store: JobStore) -> None:
    """At the app's start: every model a stored route points at gets its application again."""
    for route in list_routes(store):
        if route.model is not None and route.mode != "off":
            ensure_deployed(settings, get_model(store, route.model))
