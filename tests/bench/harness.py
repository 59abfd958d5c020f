"""Shared pieces for the Serve benchmarks: a Ray instance, the app, its reference endpoints, a load generator."""
from __future__ import annotations

import concurrent.futures as cf
import socket
import tempfile
import threading
import time
import uuid

import httpx
import numpy as np

from ray_app.demo import wait_healthy

ADMIN_KEY = "bench-" + uuid.uuid4().hex


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_started: dict = {}


def start_app(**overrides):
    """Ray + the Flywheel app (fresh embedded stores) + a no-op endpoint, once per process."""
    if "url" in _started:
        return _started["url"], _started["settings"]
    from ray import serve
    from starlette.responses import Response

    from ray_app.config import load_settings
    from ray_app.local_ray import connect
    from serve.launch import deploy, ray_runtime_env

    # Jobs the automatic trigger creates (each round posts a fresh workload) are stored, not started:
    # a flywheel job would take the CPUs being measured, and this Ray runs no dashboard to take it.
    settings = load_settings(env={"FLYWHEEL_DATA_DIR": tempfile.mkdtemp(prefix="flywheel-bench-"),
                                  "FLYWHEEL_ADMIN_KEY": ADMIN_KEY})
    settings = settings.with_overrides({"jobs": {"launch": False}}).with_overrides(overrides)
    connect(num_cpus=2, dashboard=False, log_to_driver=False,
            runtime_env=ray_runtime_env(settings))  # as deploy() starts Ray, on free ports
    url = deploy(settings, port=free_port())

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32)
    class NoOp:
        """Reads the same bodies and answers at once: the floor any ingest endpoint stands on."""

        async def __call__(self, request):
            body = await request.body()
            return Response(b'{"accepted": %d}' % len(body), media_type="application/json")

    serve.run(NoOp.bind(), name="noop", route_prefix="/noop")
    serve.run(_json_noop().bind(), name="noop-json", route_prefix="/noop-json")
    wait_healthy(url)
    _started.update(url=url, settings=settings)
    return url, settings


def _json_noop():
    """A plain FastAPI JSON endpoint: the body parsed into the declared type, nothing else done.
    Issue 2's "no-op Serve endpoint taking the same bodies" (the one that reaches about a quarter of
    the store's rate); NoOp above, which never parses, is the transport floor beside it."""
    from fastapi import Body, FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32)
    @serve.ingress(api)
    class JSONNoOp:
        @api.post("/")
        async def take(self, body: dict = Body(...)) -> dict:
            return {"accepted": len(body.get("records") or [body])}

    return JSONNoOp


def start_ceiling(url: str, settings) -> str:
    """The ceiling of any ingest endpoint on this machine, deployed beside start_app's: a body parsed
    exactly as /v1/logs parses it and its records stored exactly as it stores them (as many
    replicas, the same thread, its own embedded store), with nothing done at the door between:
    no validation, no PII scrub, no content ids, no audit. Returns its URL."""
    from ray import serve

    ceiling = settings.with_overrides({"data_dir": str(settings.data_dir / "ceiling")})
    serve.run(_parse_and_store().options(num_replicas=settings.serve.ingest_replicas)
              .bind(ceiling.model_dump(mode="json")), name="parse-store", route_prefix="/parse-store")
    return f"{url}/parse-store"


def _parse_and_store():
    import asyncio
    import gc
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve
    from starlette.responses import Response

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32)
    class ParseAndStore:
        def __init__(self, settings: dict):
            from ray_app.config import Settings
            from ray_app.ingest import Ingest
            from ray_app.storage import open_log_store

            settings = Settings.model_validate(settings)
            self.ingest, self.logs = Ingest(settings), open_log_store(settings)
            self.stamp = settings.governance.constitutional_hash
            self.thread = ThreadPoolExecutor(1)
            gc.collect()  # as FlywheelAPI does: what is loaded now stays out of later collections
            gc.freeze()

        async def __call__(self, request):
            body = await request.body()
            new = await asyncio.get_running_loop().run_in_executor(self.thread, self.store, body)
            return Response(b'{"accepted": %d}' % new, media_type="application/json")

        def store(self, raw: bytes) -> int:
            from ray_app.ingest import paused_gc

            with paused_gc():
                records = self.ingest.tool_lists.loads(raw)["records"]  # the door's parse, nothing after it
                # Time-ordered unique ids, as the store gets from the door (random ones would slow its index).
                return self.logs.put_many([dict(r, id=f"{int(r['timestamp']):010x}{uuid.uuid4().hex[:22]}",
                                                timestamp=float(r["timestamp"]), constitutional_hash=self.stamp)
                                           for r in records])

    return ParseAndStore


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}


def throughput(url: str, bodies: list[bytes], *, concurrency: int = 4) -> float:
    """Requests per second posting every body once, `concurrency` at a time."""
    local = threading.local()

    def post(body: bytes) -> None:
        client = getattr(local, "client", None) or httpx.Client(headers=headers(), timeout=120)
        local.client = client
        r = client.post(url, content=body)
        r.raise_for_status()

    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(post, bodies[:concurrency]))  # warm connections and replicas
        started = time.perf_counter()
        list(pool.map(post, bodies[concurrency:]))
        return (len(bodies) - concurrency) / (time.perf_counter() - started)


def latency_at_rate(url: str, bodies: list[bytes], *, rate: float) -> tuple[float, float]:
    """p50/p99 seconds of single posts sent open-loop at `rate` per second."""
    latencies: list[float] = []
    lock = threading.Lock()
    local = threading.local()

    def post(body: bytes) -> None:
        client = getattr(local, "client", None) or httpx.Client(headers=headers(), timeout=60)
        local.client = client
        t0 = time.perf_counter()
        client.post(url, content=body).raise_for_status()
        with lock:
            latencies.append(time.perf_counter() - t0)

    with cf.ThreadPoolExecutor(16) as pool:
        start = time.perf_counter()
        futures = []
        for i, body in enumerate(bodies):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(post, body))
        for f in futures:
            f.result()
    return float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))
