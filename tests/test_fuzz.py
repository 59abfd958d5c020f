"""schemathesis over the whole OpenAPI document of a live app: no input it can make gets a 5xx.

The app is the real one (Ray Serve, embedded stores, the gateway in front of tests/openai_upstream.py),
called with an admin key, so every route's body, query and path are fuzzed past authentication.
"""
from __future__ import annotations

from urllib.parse import urlparse

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.conftest import ADMIN_KEY
from tests.openai_upstream import Upstream


@pytest.fixture(scope="module")
def fuzzed_app(app_url, settings, tmp_path_factory):
    from ray import serve

    from ray_app.demo import wait_healthy
    from serve.launch import deploy

    with Upstream() as upstream:
        fuzz = settings.with_overrides({"data_dir": str(tmp_path_factory.mktemp("fuzz")),
                                        "gateway": {"upstream_url": upstream.url, "timeout_s": 5.0}})
        url = deploy(fuzz, port=urlparse(app_url).port, name="fuzz", route_prefix="/fuzz")
        wait_healthy(url, timeout=90)
        yield url
        serve.delete("fuzz")


def test_no_input_gets_a_server_error(fuzzed_app):
    """Every operation, bodies that fit its schema and bodies that break it (wrong types: a 4xx)."""
    schema = schemathesis.openapi.from_url(f"{fuzzed_app}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 18  # every route, the raw-body ones included
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    errors: list[str] = []
    def check(case) -> None:
        response = case.call(base_url=fuzzed_app, headers=headers, timeout=60)
        if response.status_code >= 500:
            errors.append(f"{case.method} {case.path} -> {response.status_code}: {response.text[:200]} "
                          f"body={str(case.body)[:200]}")

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run = given(operation.as_strategy(generation_mode=mode))(lambda case: check(case))  # a fresh function each
            try:
                settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)(run)()
            except Unsatisfiable:  # nothing to break: a route that takes no input has no negative case
                assert mode == GenerationMode.NEGATIVE
    assert not errors, "\n".join(errors[:10])
