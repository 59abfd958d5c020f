"""Routes and the registry without Ray: one decision per call, states that move only where they may."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from ray_app.errors import Conflict, NotFound
from ray_app.registry import ModelState, get_model, model_for_target, openai_view, register, set_state
from ray_app.routes import UPSTREAM, Route, RouteTable, decide, get_route, put_route, replace_route
from ray_app.storage.sqlite import SQLiteJobStore


def route(mode: str, **kw) -> Route:
    return Route(workload_id="w", client_id="c", model="ft:m:1", mode=mode, **kw)


def test_each_mode_names_who_answers_and_who_else():
    assert decide(Route(workload_id="w", client_id="c"), user=None, mirror=0.5).answer == UPSTREAM
    shadow = decide(route("shadow"), user=None, mirror=0.5)
    assert (shadow.answer, shadow.also, shadow.fallback) == (UPSTREAM, "ft:m:1", None)
    live = [decide(route("live"), user=None, mirror=0.25, draw=random.Random(i).random) for i in range(2000)]
    assert {d.answer for d in live} == {"ft:m:1"} and {d.fallback for d in live} == {UPSTREAM}
    mirrored = sum(d.also == UPSTREAM for d in live)
    assert abs(mirrored - 500) < 4 * (2000 * 0.25 * 0.75) ** 0.5  # binomial(2000, 0.25) within 4 sd
    assert decide(route("live", mirror=0.0), user=None, mirror=1.0).also is None  # the route's own rate wins


def test_canary_shares_and_stickiness():
    rng = random.Random(0)
    calls = [decide(route("canary", weight=0.3), user=None, mirror=0, draw=rng.random) for _ in range(4000)]
    share = sum(d.answer == "ft:m:1" for d in calls) / len(calls)
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / 4000) ** 0.5
    assert all(d.fallback == (UPSTREAM if d.answer != UPSTREAM else "ft:m:1") for d in calls)
    users = [f"user-{i}" for i in range(2000)]
    sides = {u: decide(route("canary", weight=0.3), user=u, mirror=0).answer for u in users}
    assert all(decide(route("canary", weight=0.3), user=u, mirror=0).answer == sides[u] for u in users[:200])
    assert abs(sum(s != UPSTREAM for s in sides.values()) / len(users) - 0.3) < 0.05
    # raising the weight only moves users toward the model: nobody who had it loses it
    wider = {u: decide(route("canary", weight=0.6), user=u, mirror=0).answer for u in users}
    assert all(wider[u] != UPSTREAM for u in users if sides[u] != UPSTREAM)
    # the model's canary calls are mirrored upstream as live's are (agreement keeps being measured there)
    mirrored = [decide(route("canary", weight=0.5), user=None, mirror=1.0, draw=rng.random) for _ in range(200)]
    assert all(d.also == (UPSTREAM if d.answer != UPSTREAM else None) for d in mirrored)
    assert 50 < sum(d.also == UPSTREAM for d in mirrored) < 150


@pytest.fixture()
def store(tmp_path):
    return SQLiteJobStore(str(tmp_path / "jobs.db"))


def _model(store, tmp_path: Path, job_id: str = "job1", accuracy: float = 0.9) -> dict:
    adapter = tmp_path / f"adapter-{job_id}"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text("{}")
    job = {"id": job_id, "workload_id": "w", "client_id": "c"}
    return register(store, data_dir=tmp_path, job=job, base_model="smollm2-135m", adapter=adapter,
                    workload_type="tool_calling", train_ids=["b", "a"], splits={"train": 2},
                    training={"epsilon": 7.9, "delta": 1e-5, "adapter": "x"},
                    scores={"function_name_accuracy": accuracy},
                    accuracy_ratio=accuracy, promotion={"recommended": job_id == "job1"})


def test_registry_entries_states_and_targets(store, tmp_path):
    entry = _model(store, tmp_path)
    assert entry["id"] == "ft:smollm2-135m:job1" and entry["state"] == "registered"
    assert entry["training_data"]["records_digest"] == _model(store, tmp_path / "again")["training_data"][
        "records_digest"]  # re-registering refreshes; the digest does not depend on the order of ids
    assert "adapter" not in entry["training"] and Path(entry["adapter"]).is_relative_to(tmp_path)
    view = openai_view(entry)
    assert (view["object"], view["owned_by"], list(view)[:4]) == ("model", "flywheel",
                                                                    ["id", "object", "created", "owned_by"])
    set_state(store, entry["id"], ModelState.SHADOW, reason="test")
    set_state(store, entry["id"], ModelState.ROLLED_BACK, reason="slipped")
    with pytest.raises(Conflict, match="rolled_back: it cannot move to live"):
        set_state(store, entry["id"], ModelState.LIVE, reason="no")
    assert [h["state"] for h in get_model(store, entry["id"])["history"]] == ["registered", "shadow", "rolled_back"]
    with pytest.raises(NotFound):
        set_state(store, "ft:none:0", ModelState.SHADOW, reason="x")
    assert model_for_target(store, entry["id"])["id"] == entry["id"]
    assert model_for_target(store, "job1")["id"] == entry["id"]
    with pytest.raises(NotFound, match="neither a registered model nor a job"):
        model_for_target(store, "job-unknown")


def test_a_route_is_replaced_only_where_it_was_read(store):
    shadow = put_route(store, route("shadow"))
    assert replace_route(store, shadow, route("canary", weight=0.1))
    assert not replace_route(store, shadow, Route(workload_id="w", client_id="c"))  # stale: it moved meanwhile
    assert get_route(store, "w", "c").mode == "canary"


def test_route_table_reads_the_store_at_most_once_per_ttl(store):
    table = RouteTable(store, ttl=3600)
    assert table.get("w", "c").mode == "off"
    put_route(store, route("live"))
    assert table.get("w", "c").mode == "off"  # cached
    table.forget("w", "c")
    assert table.get("w", "c").mode == "live" and get_route(store, "w", "c").model == "ft:m:1"


def test_the_rollback_rule_judges_a_full_window_by_its_upper_bound():
    from ray_app.governance.policy import PolicyEngine
    from serve.live import rollback_decision

    engine = PolicyEngine.load(constitutional_hash="cdd01ef066bc6cf2")

    def decide(**live):
        stats = {"agreement": 0.5, "ci": [0.3, 0.7], "n": 40, "attempts": 40, "error_rate": 0.0, "p99_ms": 900.0,
                 **live}
        return rollback_decision(engine, stats, threshold=0.9, min_window=30, max_error_rate=0.05, max_p99_ms=1000.0)
    assert decide()["reasons"] == ["agreement_below_threshold:0.7<0.9"]
    assert decide(ci=[0.8, 0.95])["allow"] is True  # the threshold is inside the interval: not proven worse
    assert decide(n=10, attempts=10)["allow"] is True  # too few calls to judge
    assert decide(ci=[0.8, 0.95], error_rate=0.2)["reasons"] == ["error_rate_above_bound:0.2>0.05"]
    assert decide(ci=[0.8, 0.95], p99_ms=2500.0)["reasons"] == ["p99_latency_above_bound:2500>1000"]
