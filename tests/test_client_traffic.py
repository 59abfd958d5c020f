"""The traffic simulator sends through FlywheelClient into the real Serve app."""
from __future__ import annotations

import uuid

import pytest

from ray_app.client import AuthError
from ray_app.errors import FlywheelError
from ray_app.simulator import SERVICES, generate
from ray_app.traffic import post_simulated_traffic
from tests.conftest import ADMIN_KEY


def test_simulated_traffic_is_stored_once_per_distinct_record(api, app_url):
    client_id = f"sim-{uuid.uuid4().hex[:8]}"  # the workload ids are the service names: isolate by client
    counts = post_simulated_traffic(app_url, api_key=ADMIN_KEY, per_service=60, seed=7, client_id=client_id,
                                    batch_size=25)
    assert counts == dict.fromkeys(SERVICES, 60)
    for service in SERVICES:
        sent = list(generate(service, 60, client_id=client_id, seed=7))
        distinct = len({id(record) for record in sent})  # a repeated object is a client retry
        assert distinct < 60  # the seed has retries in every service, or this would prove nothing
        stored = api.get("/v1/logs", params={"workload_id": service, "client_id": client_id,
                                             "limit": 1000}).json()["records"]
        assert len(stored) == len({r["id"] for r in stored}) == distinct


def test_a_refused_key_raises_a_flywheel_error(app_url):
    with pytest.raises(AuthError) as caught:
        post_simulated_traffic(app_url, api_key="not-a-key", per_service=5)
    assert isinstance(caught.value, FlywheelError) and caught.value.status == 401


def test_a_mapping_posts_only_the_services_it_names(api, app_url):
    client_id = f"sim-{uuid.uuid4().hex[:8]}"
    counts = post_simulated_traffic(app_url, api_key=ADMIN_KEY, per_service={"customer-service": 30}, seed=3,
                                    client_id=client_id)
    assert counts == {"customer-service": 30}
    workloads = {w["workload_id"] for w in api.get("/v1/workloads").json() if w["client_id"] == client_id}
    assert workloads == {"customer-service"}
    with pytest.raises(ValueError, match="no simulated service 'billing'"):
        post_simulated_traffic(app_url, api_key=ADMIN_KEY, per_service={"billing": 5})
