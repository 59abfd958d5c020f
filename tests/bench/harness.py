"""Shared pieces for the Serve benchmarks: a Ray instance, the app, a no-op twin, a load generator."""
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
    import ray
    from ray import serve
    from starlette.responses import Response

    from ray_app.config import load_settings
    from serve.app import deploy

    settings = load_settings(env={"FLYWHEEL_DATA_DIR": tempfile.mkdtemp(prefix="flywheel-bench-"),
                                  "FLYWHEEL_ADMIN_KEY": ADMIN_KEY}).with_overrides(overrides)
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
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
