"""The Ray Serve app: a FastAPI ingress over the stores.

Request bodies are read raw and parsed with orjson + pydantic-core rather than through
FastAPI's body models: at 1,000 records a batch that is the difference between a quarter
and most of the store's own insert rate. Log bodies go through the door's own parser
(ray_app/ingest.py), which handles a service's repeated tool definitions once. Domain errors become HTTP
codes here and nowhere else (see serve/errors.py).

No `from __future__ import annotations` here: FastAPI must see real `Request` types
through Serve's ingress wrapper, or it mistakes them for query parameters.
"""

import asyncio
import gc
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import Query, Request
from fastapi.responses import Response
from ray import serve
from starlette.concurrency import run_in_threadpool

from ray_app import governance
from ray_app.auth import Authenticator
from ray_app.config import Settings
from ray_app.errors import FlywheelError, InvalidRecord, NotFound, PayloadTooLarge
from ray_app.governance.audit import INGEST_BATCH, JOB_STAGE, VALIDATION, verify
from ray_app.governance.metrics import StoreCollector, governance_metrics
from ray_app.ingest import Ingest, paused_gc, stored_id
from ray_app.jobs import create_job, delete_job, request_cancel, summary
from ray_app.launcher import launch, reconcile
from ray_app.routes import Route
from ray_app.schemas import (
    ChatCompletionCreate,
    IngestBatch,
    JobCreate,
    LogRecord,
    ValidateContent,
    check_record,
    invalid_from_pydantic,
)
from ray_app.storage import open_job_store, open_log_store
from ray_app.trigger import Trigger
from serve.call_log import CallLog
from serve.deployer import deploy_routed_models
from serve.gateway import Gateway
from serve.http import api, body, json_response, parse_json
from serve.metrics import create_metrics


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(api)
class FlywheelAPI:
    def __init__(self, settings: Settings, metrics_dir: str | None = None):
        self.settings = settings  # typed through .bind(): validated once, at the entry point
        self.logs = open_log_store(self.settings)
        self.jobs = open_job_store(self.settings)
        self.logs.ping()  # a store that is down at start fails the deployment, naming its URI
        self.jobs.ping()
        self.auth = Authenticator(self.jobs, admin_key=self.settings.admin_key)
        privacy = self.settings.training.privacy
        store_metrics = StoreCollector(self.jobs, budget_epsilon=privacy.budget_epsilon, delta=privacy.delta)
        self.metrics = create_metrics(Path(metrics_dir) if metrics_dir else None, collectors=[store_metrics])
        api.state.metrics = self.metrics  # serve/metrics.py RequestMetrics: every request, by route and status
        self.governance = governance_metrics(self.metrics.registry if metrics_dir is None else None)
        self.ingest = Ingest(self.settings)
        self._ingest_thread = ThreadPoolExecutor(1, thread_name_prefix="ingest")  # batches one at a time
        constitution = governance.from_settings(self.settings)
        # A policy that does not load stops the deployment here, naming the file and line.
        self.policies, self.validator = constitution.policies, constitution.validator
        # MiniLM loads now, not on the first request; one torch thread, as validations run side by side
        self.validator.semantic.warm(threads=1)
        self.audit_store, self.audit = constitution.audit_store, constitution.audit
        self.trigger = Trigger(self.settings, self.logs, self.jobs)
        self._launcher = ThreadPoolExecutor(2, thread_name_prefix="launch")
        # the gateway (serve/gateway.py): its calls are logged off the hot path, through this replica's door
        calls = CallLog(self.ingest, self.logs, self._ingest_thread, on_stored=self._calls_stored)
        self.gateway = Gateway(self.settings, jobs=self.jobs, logs=self.logs, auth=self.auth, audit=self.audit,
                               policies=self.policies, metrics=self.metrics, call_log=calls, read_json=self._read_json)
        self._launcher.submit(deploy_routed_models, self.settings, self.jobs)  # after a restart: serve them again
        # Everything loaded so far lives as long as the replica: keep it out of every future
        # collection (each full one would otherwise walk Ray's, FastAPI's and pydantic's objects).
        gc.collect()
        gc.freeze()

    # ---- health and metrics ------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> Response:
        return json_response({"status": "ok"})

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        self.auth.require(request.headers.get("authorization"), "metrics:read")
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4")

    # ---- logs --------------------------------------------------------------------------

    @api.post("/v1/logs", openapi_extra=body(LogRecord, IngestBatch))
    async def post_logs(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            self.auth.require(request.headers.get("authorization"), "logs:write")
            raw = await self._read_body(request)
        except FlywheelError as exc:
            self.metrics.rejects.labels(exc.reason).inc()
            raise
        # The rest runs on the replica's one ingest thread, so the event loop meanwhile receives
        # the next bodies from the proxy (inline, a replica would wait idle for each body in turn).
        response, jobs = await asyncio.get_running_loop().run_in_executor(self._ingest_thread, self._ingest,
                                                                           raw, started)
        for job in jobs:
            self._start(job)
        return response

    def _ingest(self, raw: bytes, started: float) -> tuple[Response, list[dict[str, Any]]]:
        with paused_gc():
            return self._ingest_batch(raw, started)

    def _ingest_batch(self, raw: bytes, started: float) -> tuple[Response, list[dict[str, Any]]]:
        """The response, and the jobs the batch triggered (started back on the event loop)."""
        read = time.perf_counter()  # Server-Timing: read (received, queued); scrub (the door, parse included)
        try:
            door = self.ingest.body(raw)  # parsed, validated, PII-scrubbed, hash-stamped, in one call
            records = door.records
            parsed = time.perf_counter()
            # In the same thread as the parsing: a writer thread fighting the parser for the GIL
            # made each write 10x slower.
            new = self.logs.put_many(records)
        except FlywheelError as exc:
            self.metrics.rejects.labels(exc.reason).inc()
            raise
        stored = time.perf_counter()
        jobs = self._stored(records, new, door.pii_counts)
        self.metrics.latency.observe(stored - started)
        timing = f"read;dur={(read - started) * 1e3:.2f}, scrub;dur={(parsed - read) * 1e3:.2f}, " \
                 f"store;dur={(stored - parsed) * 1e3:.2f}"
        return json_response({"accepted": len(records), "duplicates": len(records) - new,
                              "ids": [r["id"] for r in records]}, headers={"Server-Timing": timing}), \
            jobs

    @api.get("/v1/logs")
    async def get_logs(self, request: Request, workload_id: str | None = None, client_id: str | None = None,
                       limit: int = Query(100, ge=1, le=50_000)) -> Response:
        self.auth.require(request.headers.get("authorization"), "logs:read")
        records = await run_in_threadpool(self.logs.query, workload_id=workload_id, client_id=client_id,
                                          limit=limit)
        return json_response({"records": records})

    @api.post("/v1/logs/{record_id}/feedback", openapi_extra=body({"type": "object", "minProperties": 1},
                                                                   example={"rating": 1}))
    async def post_feedback(self, record_id: str, request: Request) -> Response:
        self.auth.require(request.headers.get("authorization"), "feedback:write")
        body = await self._read_json(request)
        if not isinstance(body, dict) or not body:
            raise InvalidRecord("feedback must be a non-empty JSON object, e.g. {\"rating\": 1}", field="(body)")
        if not await run_in_threadpool(self.logs.set_feedback, stored_id(record_id), body):
            raise NotFound(f"no log record with id {record_id!r}", field="record_id")
        return json_response({"id": record_id, "updated": True})

    @api.get("/v1/workloads")
    async def workloads(self, request: Request) -> Response:
        self.auth.require(request.headers.get("authorization"), "logs:read")
        return json_response(await run_in_threadpool(self.logs.workloads))

    # ---- governance --------------------------------------------------------------------

    @api.post("/v1/validate", openapi_extra=body(ValidateContent, LogRecord))
    async def validate(self, request: Request) -> Response:
        """{"content", "context"?} or a whole log record -> the verdict. JSON of the wrong shape: 422, as /v1/logs."""
        self.auth.require(request.headers.get("authorization"), "validate")
        body = await self._read_json(request)
        if isinstance(body, dict) and "response" in body:
            check_record(body)  # a record of the wrong shape: 422 naming the field, as /v1/logs says
            check = (self.validator.validate_record, body)
        elif isinstance(body, dict) and isinstance(body.get("content"), str):
            context = body.get("context")
            context = {} if context is None else context
            if not isinstance(context, dict):
                raise InvalidRecord(f"context must be a JSON object, not {type(context).__name__}", field="context")
            check = (self.validator.validate, body["content"], context)
        else:
            raise InvalidRecord('content must be a string: send {"content": "...", "context": {...}} or a whole log '
                                "record", field="content")
        result = await run_in_threadpool(*check)  # MiniLM takes milliseconds: off the event loop
        self.governance.observe_validation(result)
        self.audit.record(VALIDATION, {k: result[k] for k in ("allow", "compliance_score", "violations")},
                          outcome="success" if result["allow"] else "denied")
        return json_response(result)

    @api.get("/v1/audit")
    async def audit_entries(self, request: Request, start_seq: int = Query(0, ge=0, le=2**63 - 1),
                            limit: int = Query(100, ge=1, le=10_000)) -> Response:
        self.auth.require(request.headers.get("authorization"), "audit:read")
        entries = await run_in_threadpool(lambda: list(self.audit_store.entries(start_seq=start_seq, limit=limit)))
        return json_response({"entries": entries})

    @api.get("/v1/audit/verify")
    async def audit_verify(self, request: Request) -> Response:
        self.auth.require(request.headers.get("authorization"), "audit:read")
        result = await run_in_threadpool(verify, self.audit_store)
        return json_response({"ok": result.ok, "entries": result.entries, "first_bad_seq": result.first_bad_seq,
                              "reason": result.reason})

    # ---- the gateway: chat completions, models, routes (serve/gateway.py) -----------------

    @api.post("/v1/chat/completions", openapi_extra=body(ChatCompletionCreate))
    async def chat_completions(self, request: Request) -> Response:
        return await self.gateway.chat(request)

    @api.get("/v1/models")
    async def list_models(self, request: Request, workload_id: str | None = None) -> Response:
        return await self.gateway.models(request, workload_id)

    @api.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request) -> Response:
        return await self.gateway.model(request, model_id)

    @api.get("/v1/routes")
    async def list_routes(self, request: Request) -> Response:
        return await self.gateway.get_routes(request)

    @api.post("/v1/routes", openapi_extra=body(Route))
    async def set_route(self, request: Request) -> Response:
        return await self.gateway.post_route(request)

    # ---- jobs --------------------------------------------------------------------------

    @api.post("/v1/jobs", openapi_extra=body(JobCreate))
    async def post_job(self, request: Request) -> Response:
        self.auth.require(request.headers.get("authorization"), "jobs:write")
        body = await self._read_json(request)
        try:
            spec = JobCreate.model_validate(body)
        except Exception as exc:  # pydantic's ValidationError; named precisely below
            raise invalid_from_pydantic(exc) from exc
        job = await run_in_threadpool(create_job, self.settings, self.jobs, workload_id=spec.workload_id,
                                      client_id=spec.client_id, config=spec.config)
        self._start(job)
        return json_response(summary(job), status_code=201)

    @api.get("/v1/jobs")
    async def list_jobs(self, request: Request, workload_id: str | None = None, client_id: str | None = None,
                        status: str | None = None, limit: int = Query(100, ge=1, le=1_000)) -> Response:
        self.auth.require(request.headers.get("authorization"), "jobs:read")
        jobs = await run_in_threadpool(self.jobs.list_jobs, workload_id=workload_id, client_id=client_id,
                                       status=status, limit=limit)
        if self.settings.jobs.launch:  # the unfinished ones settled as GET /v1/jobs/{id} does (finished: no call)
            jobs = await run_in_threadpool(lambda: [reconcile(self.jobs, job) for job in jobs])
            jobs = [job for job in jobs if status is None or job["status"] == status]
        return json_response({"jobs": jobs})

    @api.get("/v1/jobs/{job_id}")
    async def get_job(self, job_id: str, request: Request) -> Response:
        self.auth.require(request.headers.get("authorization"), "jobs:read")
        job = await run_in_threadpool(self.jobs.get_job, job_id)
        if self.settings.jobs.launch:
            job = await run_in_threadpool(reconcile, self.jobs, job)
        return json_response(job)

    @api.post("/v1/jobs/{job_id}/cancel")
    async def cancel_job(self, job_id: str, request: Request) -> Response:
        self.auth.require(request.headers.get("authorization"), "jobs:write")
        job = await run_in_threadpool(request_cancel, self.jobs, job_id)
        self.audit.record(JOB_STAGE, {"job_id": job_id, "stage": "cancel_requested", "status": job["status"]})
        return json_response(summary(job))

    @api.delete("/v1/jobs/{job_id}")
    async def delete_job(self, job_id: str, request: Request) -> Response:
        self.auth.require(request.headers.get("authorization"), "jobs:write")
        job = await run_in_threadpool(delete_job, self.jobs, job_id)
        return json_response({"id": job["id"], "status": "deleted"})

    # ---- helpers -----------------------------------------------------------------------

    def _start(self, job: dict[str, Any]) -> None:
        """Audit a new job and, unless configured otherwise, submit it as a Ray job in the background."""
        self.audit.record(JOB_STAGE, {"job_id": job["id"], "stage": "created", "workload_id": job["workload_id"],
                                      "client_id": job["client_id"], "trigger": job["trigger"]})
        if self.settings.jobs.launch:
            self._launcher.submit(launch, self.settings, self.jobs, self.audit, job)

    def _stored(self, records: list[dict[str, Any]], new: int, pii: dict[str, int],
                **audited: Any) -> list[dict[str, Any]]:
        """After records are stored (a /v1/logs batch or gateway calls): counted, audited, and the jobs
        they trigger (the trigger is throttled: one count query a second)."""
        self.governance.observe_scrub(pii)
        self._count_ingest(records, new)
        workloads = {(r["workload_id"], r["client_id"]) for r in records}
        self.audit.record(INGEST_BATCH, {"records": len(records), "new": new, "pii_scrubbed": dict(pii),
                                         "workloads": sorted({w for w, _ in workloads}), **audited})
        jobs = [self.trigger.check(workload_id, client_id) for workload_id, client_id in workloads] if new else []
        return [job for job in jobs if job]

    def _calls_stored(self, records: list[dict[str, Any]], new: int, pii: dict[str, int]) -> None:
        """Gateway calls are log records like any other: counted, audited, and they may trigger a job
        (those a served model answered alone count for nothing there: ray_app/trigger.py)."""
        self.trigger.note_model_only(records)
        for job in self._stored(records, new, pii, served_by=sorted({r["served_by"] for r in records})):
            self._start(job)
        self.gateway.watch.stored(records)  # a served model's window filled: the rollback rule judges it

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.serve.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"body of {declared} bytes is over the limit of {limit}")
        raw = await request.body()
        if len(raw) > limit:
            raise PayloadTooLarge(f"body of {len(raw)} bytes is over the limit of {limit}")
        return raw

    async def _read_json(self, request: Request) -> Any:
        return parse_json(await self._read_body(request))

    def _count_ingest(self, records: list[dict[str, Any]], new: int) -> None:
        types: dict[str, int] = {}
        for r in records:
            types[r["workload_type"]] = types.get(r["workload_type"], 0) + 1
        for workload_type, n in types.items():
            self.metrics.ingested.labels(workload_type).inc(n)
        self.metrics.duplicates.inc(len(records) - new)


def build_app(settings: Settings) -> serve.Application:
    # A fresh folder per deployment: prometheus-client's multiprocess files from an earlier
    # run would otherwise be summed into this one's counters.
    metrics_dir = settings.data_dir.resolve() / "metrics" / uuid.uuid4().hex[:12]
    metrics_dir.mkdir(parents=True, exist_ok=True)
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    return FlywheelAPI.options(
        num_replicas=settings.serve.ingest_replicas,
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env}},
    ).bind(settings, str(metrics_dir))


def app_builder(args: dict[str, str]) -> serve.Application:
    """For `serve run` / `serve deploy`: `import_path: serve.app:app_builder`, args {config: FILE}."""
    from ray_app.config import load_settings

    return build_app(load_settings(args.get("config")))
