"""The gateway: OpenAI's chat completions answered by the upstream or a registered model, per route.

`POST /v1/chat/completions` is what a service's OpenAI client calls once its base URL points at
Flywheel. The workload comes from `X-Flywheel-Workload-Id` / `X-Flywheel-Client-Id` (or OpenAI's
`metadata` field); its route (ray_app/routes.py) says who answers and who else answers the same
request off the hot path (shadow, live's mirror). `X-Flywheel-Model` names who answered.

Faults: in canary and live a side that fails hands the call to the other (a dead model replica
never fails a caller); the upstream down or slow is a 502/504 naming it. Every answered call is
logged as its own record through the door (serve/call_log.py), after the caller has its answer.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from starlette.concurrency import run_in_threadpool

from evals.live import agreement, live_stats
from ray_app.auth import Authenticator
from ray_app.config import Settings
from ray_app.errors import FlywheelError, InvalidRecord, PolicyDenied, UpstreamFailed
from ray_app.governance.audit import ROUTE_CHANGE, AuditLog
from ray_app.governance.policy import PolicyEngine
from ray_app.registry import get_model, list_models, openai_view
from ray_app.routes import UPSTREAM, Decision, Route, RouteTable, decide, list_routes
from ray_app.schemas import check_chat_request, invalid_from_pydantic
from ray_app.storage.base import JobStore, LogStore
from serve.call_log import CallLog
from serve.deployer import change_route
from serve.http import json_response
from serve.live import LiveWatch
from serve.metrics import ServeMetrics
from serve.model_server import app_name
from serve.upstream import Refused, Upstream, assemble, stream_chunks

WORKLOAD_HEADER, CLIENT_HEADER = "x-flywheel-workload-id", "x-flywheel-client-id"
log = logging.getLogger("flywheel.gateway")
DROPPED = ("stream", "stream_options")  # how the caller reads the answer, not part of the interaction


class CandidateFailed(FlywheelError):
    reason = "candidate_failed"


def workload_of(request: Request, body: dict[str, Any]) -> tuple[str, str]:
    meta = body.get("metadata") or {}
    workload = request.headers.get(WORKLOAD_HEADER) or meta.get("workload_id")
    client = request.headers.get(CLIENT_HEADER) or meta.get("client_id")
    if not workload or not client:
        raise InvalidRecord("name the workload: headers X-Flywheel-Workload-Id and X-Flywheel-Client-Id, or "
                            'metadata {"workload_id", "client_id"}', field="metadata.workload_id")
    return workload, client


def upstream_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request as the upstream gets it: Flywheel's own metadata keys taken out."""
    out = {k: v for k, v in body.items() if k not in DROPPED}
    meta = {k: v for k, v in (body.get("metadata") or {}).items() if k not in ("workload_id", "client_id")}
    if meta:
        out["metadata"] = meta
    else:
        out.pop("metadata", None)
    return out


class Gateway:
    """The gateway's handlers; FlywheelAPI (serve/app.py) routes to them and lends its stores and door."""

    def __init__(self, settings: Settings, *, jobs: JobStore, logs: LogStore, auth: Authenticator, audit: AuditLog,
                 policies: PolicyEngine, metrics: ServeMetrics, call_log: CallLog,
                 read_json: Callable[[Request], Awaitable[Any]]):
        self.settings, self.jobs, self.logs, self.auth, self.audit = settings, jobs, logs, auth, audit
        self.policies, self.metrics, self._read_json = policies, metrics, read_json
        self.gateway_log = call_log
        self.watch = LiveWatch(self)
        self.routes = RouteTable(jobs, ttl=settings.gateway.route_cache_s)
        self.side_calls = 0  # shadow and mirror calls in flight on this replica
        self._tasks: set[asyncio.Task] = set()  # held: the event loop keeps only weak references
        self._handles: dict[str, Any] = {}  # model id -> its Serve app's handle (one router each, kept)
        self.upstream = Upstream(settings.gateway)

    async def chat(self, request: Request) -> Response:
        started = time.perf_counter()
        self.auth.require(request.headers.get("authorization"), "chat")
        body = check_chat_request(await self._read_json(request))
        workload_id, client_id = workload_of(request, body)
        route = self.routes.cached(workload_id, client_id) or await run_in_threadpool(self.routes.get, workload_id,
                                                                                       client_id)
        decision = decide(route, user=body.get("user"), mirror=self.settings.gateway.mirror)
        call = {"workload_id": workload_id, "client_id": client_id, "route": route, "started": started,
                "request": upstream_body(body)}
        if body.get("stream") and decision.answer == UPSTREAM:
            return await self._relay_stream(call, decision)
        who, answer = await self._answer_with_fallback(decision, call["request"])
        self.metrics.routed.labels(workload_id, who, route.mode).inc()
        self.metrics.call_latency.labels(who, route.mode).observe(time.perf_counter() - started)
        if isinstance(answer, Refused):
            return Response(answer.body, status_code=answer.status, media_type="application/json",
                            headers={"X-Flywheel-Model": who})
        self._log_later(call, who, answer, decision)
        headers = {"X-Flywheel-Model": who}
        if body.get("stream"):
            return StreamingResponse(iter(stream_chunks(answer)), media_type="text/event-stream", headers=headers)
        return json_response(answer, headers=headers)

    async def _answer_with_fallback(self, decision: Decision, body: dict[str, Any]) -> tuple[str, Any]:
        try:
            return decision.answer, await self._call(decision.answer, body)
        except (UpstreamFailed, CandidateFailed) as exc:
            if decision.fallback is None:
                raise
            log.warning("%s failed (%s); %s answers", decision.answer, exc.message, decision.fallback)
            return decision.fallback, await self._call(decision.fallback, body)

    async def _call(self, who: str, body: dict[str, Any]) -> Any:
        if who == UPSTREAM:
            return await self.upstream.complete(body)
        try:
            handle = self._handles.get(who) or self._handles.setdefault(who, serve.get_app_handle(app_name(who)))
            return await asyncio.wait_for(handle.remote(body), timeout=self.settings.gateway.timeout_s)
        except Exception as exc:
            self._handles.pop(who, None)  # an app deleted and deployed again needs a fresh handle
            raise CandidateFailed(f"model {who} failed: {type(exc).__name__}: {str(exc)[:160]}") from exc

    async def _relay_stream(self, call: dict[str, Any], decision: Decision) -> Response:
        """The upstream's stream relayed as it comes; the first chunk is awaited here, so an upstream
        that cannot answer still gets the fallback (or a clean 502/504) instead of a broken stream."""
        chunks = self.upstream.stream(call["request"])
        try:
            first = await chunks.__anext__()
        except UpstreamFailed:
            if decision.fallback is None:
                raise
            answer = await self._call(decision.fallback, call["request"])
            self._log_later(call, decision.fallback, answer, decision)
            return StreamingResponse(iter(stream_chunks(answer)), media_type="text/event-stream",
                                     headers={"X-Flywheel-Model": decision.fallback})
        if isinstance(first, Refused):
            return Response(first.body, status_code=first.status, media_type="application/json",
                            headers={"X-Flywheel-Model": UPSTREAM})

        async def relay():
            seen = [first]
            yield first
            async for line in chunks:
                seen.append(line)
                yield line
            answer = assemble(seen)
            if answer is not None:
                self._log_later(call, UPSTREAM, answer, decision)
        return StreamingResponse(relay(), media_type="text/event-stream", headers={"X-Flywheel-Model": UPSTREAM})

    def _log_later(self, call: dict[str, Any], who: str, answer: dict[str, Any], decision: Decision) -> None:
        """Log the call once the caller has its answer; with a shadow or mirror, once that answered too."""
        latency_ms = (time.perf_counter() - call["started"]) * 1e3
        route: Route = call["route"]
        raw = {"id": f"gw-{uuid.uuid4().hex}", "timestamp": time.time(), "workload_id": call["workload_id"],
               "client_id": call["client_id"], "request": call["request"], "response": answer,
               "served_by": who, "route": {"mode": route.mode, "model": route.model},
               "performance_metrics": {"latency_ms": round(latency_ms, 2)}}
        if who != decision.answer and decision.answer != UPSTREAM:
            raw["fallback_from"] = decision.answer  # the model failed this call: it counts against it
        other = decision.also
        if other is None or who == other:
            self.gateway_log.put(raw)
            return
        if self.side_calls >= self.settings.gateway.max_side_calls:
            # A model slower than the traffic would pile shadow work up without end (and delay its own
            # live calls behind it): past the cap a call goes without its side answer, and says so.
            raw["shadow"] = {"served_by": other, "skipped": "busy"}
            self.gateway_log.put(raw)
            return
        self.side_calls += 1
        task = asyncio.get_running_loop().create_task(self._with_other_side(raw, other, call["request"]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _with_other_side(self, raw: dict[str, Any], other: str, body: dict[str, Any]) -> None:
        started = time.perf_counter()
        side: dict[str, Any] = {"served_by": other, "role": "mirror" if other == UPSTREAM else "shadow"}
        try:
            answer = await asyncio.wait_for(self._call(other, body), timeout=self.settings.gateway.shadow_timeout_s)
            side["response"] = None if isinstance(answer, Refused) else answer
            if side["response"] is not None:  # scored as the offline evaluation scores (serve/live.py)
                ours, theirs = (raw["response"], answer) if other == UPSTREAM else (answer, raw["response"])
                side["agreement"] = await run_in_threadpool(agreement, ours, theirs)
        except Exception as exc:  # noqa: BLE001 - the side answer is a measurement; its failure is recorded
            side["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        finally:
            self.side_calls -= 1
        side["latency_ms"] = round((time.perf_counter() - started) * 1e3, 2)
        raw["shadow"] = side
        self.gateway_log.put(raw)

    # ---- models and routes -------------------------------------------------------------

    async def models(self, request: Request, workload_id: str | None) -> Response:
        self.auth.require(request.headers.get("authorization"), "models:read")
        models = await run_in_threadpool(list_models, self.jobs, workload_id=workload_id)
        return json_response({"object": "list", "data": [openai_view(m) for m in models]})

    async def model(self, request: Request, model_id: str) -> Response:
        """The registry entry with `live`: agreement over its last window of calls, beside the offline scores."""
        self.auth.require(request.headers.get("authorization"), "models:read")
        doc = await run_in_threadpool(get_model, self.jobs, model_id)
        doc["live"] = await run_in_threadpool(live_stats, self.logs, model_id, doc["workload_id"], doc["client_id"],
                                              window=self.settings.gateway.window_size)
        return json_response(openai_view(doc))

    async def get_routes(self, request: Request) -> Response:
        self.auth.require(request.headers.get("authorization"), "models:read")
        routes = await run_in_threadpool(list_routes, self.jobs)
        return json_response({"routes": [r.model_dump(mode="json") for r in routes]})

    async def post_route(self, request: Request) -> Response:
        role = self.auth.require(request.headers.get("authorization"), "routes:write")
        body = await self._read_json(request)
        try:
            route = Route.model_validate({k: v for k, v in body.items() if k != "updated_at"}
                                         if isinstance(body, dict) else body)
        except Exception as exc:  # pydantic's ValidationError, named by field below
            raise invalid_from_pydantic(exc) from exc
        try:
            result = await run_in_threadpool(change_route, self.settings, self.jobs, self.policies, route)
        except PolicyDenied as exc:
            self.audit.record(ROUTE_CHANGE, {**route.model_dump(mode="json"), "actor_role": role,
                                             "decision": exc.details}, outcome="denied")
            raise
        self.routes.forget(route.workload_id, route.client_id)
        self.audit.record(ROUTE_CHANGE, {**route.model_dump(mode="json"), "actor_role": role,
                                         "previous": result["previous"], "decision": result["decision"]})
        return json_response(result)
