"""Session fixtures: one Ray instance, one Serve app on a free port, an admin key.

Tests isolate themselves by using their own workload ids, not their own apps: starting
Serve takes seconds, and a second `ray.init` per test would take far longer.
"""
from __future__ import annotations

import uuid

import httpx
import pytest

from ray_app.config import Settings, load_settings
from ray_app.demo import wait_healthy
from tests.standin_ingest import free_port  # below the ephemeral range: see test_client_bar

ADMIN_KEY = "test-admin-" + uuid.uuid4().hex


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("flywheel")


@pytest.fixture(scope="session")
def settings(data_dir) -> Settings:
    base = load_settings(env={"FLYWHEEL_DATA_DIR": str(data_dir), "FLYWHEEL_ADMIN_KEY": ADMIN_KEY})
    # Small limits so the over-limit tests stay cheap.
    # Jobs are only stored here; tests/test_jobs_run.py deploys an app that launches them.
    return base.with_overrides({"serve": {"max_batch_records": 2000, "max_body_bytes": 4 * 1024 * 1024},
                                "jobs": {"launch": False, "auto_trigger": False}})


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from ray_app.local_ray import connect

    # The dashboard runs the Jobs API, which POST /v1/jobs and the automatic trigger submit to. A Ray of
    # the session's own, on free ports, so other Rays on the machine and this one leave each other be.
    connect(num_cpus=2, namespace="flywheel-tests", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def app_url(ray_session, settings):
    from ray import serve

    from serve.launch import deploy

    url = deploy(settings, port=free_port())
    wait_healthy(url, timeout=60)
    yield url
    serve.shutdown()


@pytest.fixture
def api(app_url):
    with httpx.Client(base_url=app_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as client:
        yield client


@pytest.fixture
def workload_id() -> str:
    return "w-" + uuid.uuid4().hex[:10]


def chat_record(workload_id: str, i: int, client_id: str = "acme", **extra) -> dict:
    return {"workload_id": workload_id, "client_id": client_id, "timestamp": 1_700_000_000 + i,
            "request": {"model": "big", "messages": [{"role": "user", "content": f"question {i}"}]},
            "response": {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer {i}"}}]},
            **extra}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer Llama built from a config (and SmolLM2's tokenizer): real code paths, seconds to train."""
    from tests.tiny_models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


# What makes a test slow or needs the servers, read from the test itself, so the markers cannot drift:
# `make test-fast` (-m "not slow and not servers") is the inner loop, `make test` runs everything.
SLOW_FIXTURES = {"ray_session", "tiny_model"}  # a Ray, Serve, or a model that trains or generates
SLOW_MODULES = {"test_ray_beside_ray", "test_cli_serve", "test_cluster_local", "test_client_bar"}  # Rays of their own
SERVER_MODULES = {"test_api_backends", "test_store_faults"}
SERVER_BACKENDS = {"elasticsearch", "mongodb"}


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if SLOW_FIXTURES & set(item.fixturenames) or module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        params = item.callspec.params.values() if hasattr(item, "callspec") else ()
        if module in SERVER_MODULES or SERVER_BACKENDS & {str(p) for p in params}:
            item.add_marker(pytest.mark.servers)
