"""The loop's own judgement (serve/live.py) on real stores, without Serve: a model that agrees with the
upstream over full windows climbs shadow -> canary -> live through the `promotion` rule with
`gateway.auto_promote` on; one that disagrees is rolled back within one window, once however many
replicas judge it at the same moment; the audit chain holds every change and verifies.

The model's Serve application is the one thing stubbed (`ensure_deployed` / `undeploy`): starting and
deleting it is tests/test_gateway.py's business, with a real model behind it."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from ray_app import governance
from ray_app.config import Settings
from ray_app.governance.audit import verify
from ray_app.ingest import Ingest
from ray_app.registry import get_model, register
from ray_app.routes import Route, RouteTable, get_route
from ray_app.storage import open_job_store, open_log_store
from serve import deployer, live
from tests.workloads import TOOLS

WINDOW = 40  # 40 agreeing calls of 40: the Wilson interval's lower bound (0.912) clears the 0.90 threshold
CALL = {"name": "lookup_order", "arguments": '{"order_id": "1234"}'}


class _Gauge:
    def __init__(self):
        self.values: list[float] = []

    def labels(self, *names):
        return self

    def set(self, value):
        self.values.append(value)

    def inc(self, value=1.0):
        self.values.append(value)


@pytest.fixture
def watched(tmp_path, monkeypatch):
    """A gateway's parts as LiveWatch uses them, and a registered model (offline: good enough to promote)."""
    monkeypatch.setattr(deployer, "ensure_deployed", lambda settings, model: None)
    monkeypatch.setattr(deployer, "undeploy", lambda model_id: None)
    monkeypatch.setattr(live, "undeploy", lambda model_id: None)
    settings = Settings(data_dir=tmp_path, governance={"audit_sample_rate": 1.0},
                        gateway={"window_size": WINDOW, "min_window": 10, "auto_promote": True,
                                 "canary_weight": 0.2, "route_cache_s": 0.0})
    built = governance.from_settings(settings)
    jobs = open_job_store(settings)
    gateway = SimpleNamespace(settings=settings, jobs=jobs, logs=open_log_store(settings), policies=built.policies,
                              audit=built.audit, routes=RouteTable(jobs, ttl=0.0),
                              metrics=SimpleNamespace(live_agreement=_Gauge(), rollbacks=_Gauge()))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    model = register(jobs, data_dir=tmp_path, job={"id": "job1", "workload_id": "w", "client_id": "c"},
                     base_model="smollm2-135m", adapter=adapter, workload_type="tool_calling", train_ids=["a"],
                     splits={"train": 1}, training={"epsilon": 7.9, "delta": 1e-5},
                     scores={"function_name_accuracy": 0.95, "compliance_rate": 1.0}, accuracy_ratio=0.95,
                     promotion={"recommended": True})
    return gateway, model["id"], built


def _calls(gateway, model: str, mode: str, agree: bool, n: int) -> None:
    """n gateway calls as serve/gateway.py logs them, through the door, each scored against the upstream."""
    called = [{"id": "c1", "type": "function", "function": CALL}]
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": called}}]}
    score = {"name": float(agree), "args": float(agree)}
    raws = []
    for i in range(n):
        raw = {"id": f"gw-{mode}-{agree}-{time.time_ns()}-{i}", "timestamp": time.time(), "workload_id": "w",
               "client_id": "c", "request": {"model": "gpt-big", "tools": TOOLS,
                                             "messages": [{"role": "user", "content": f"Where is order {i}?"}]},
               "response": answer, "route": {"mode": mode, "model": model},
               "performance_metrics": {"latency_ms": 120.0}}
        if mode == "shadow":
            raw |= {"served_by": "upstream", "shadow": {"served_by": model, "role": "shadow", "agreement": score,
                                                        "latency_ms": 300.0}}
        else:  # the model answered; the upstream's mirrored answer scored it
            raw |= {"served_by": model, "shadow": {"served_by": "upstream", "role": "mirror", "agreement": score,
                                                   "latency_ms": 200.0}}
        raws.append(raw)
    gateway.logs.put_many(Ingest(gateway.settings).records(raws).records)


def _put(gateway, mid: str, mode: str) -> None:
    """As an operator's POST /v1/routes does (promotion asked for canary/live; the model's state follows)."""
    deployer.change_route(gateway.settings, gateway.jobs, gateway.policies,
                          Route(workload_id="w", client_id="c", model=mid, mode=mode))


def _route_changes(built) -> list[dict]:
    return [e["event"] for e in built.audit_store.entries() if e["event"]["type"] in ("route_change", "rollback")]


def test_a_model_that_agrees_climbs_to_live_one_full_window_at_a_time(watched):
    gateway, mid, built = watched
    watch = live.LiveWatch(gateway)
    _put(gateway, mid, "shadow")
    _calls(gateway, mid, "shadow", True, WINDOW - 1)
    assert watch.judge(mid, "w", "c")["allow"] and get_route(gateway.jobs, "w", "c").mode == "shadow"  # not full
    _calls(gateway, mid, "shadow", True, 1)
    watch.judge(mid, "w", "c")
    route = get_route(gateway.jobs, "w", "c")
    assert (route.mode, route.weight) == ("canary", 0.2) and get_model(gateway.jobs, mid)["state"] == "canary"
    watch.judge(mid, "w", "c")  # the shadow calls do not count for canary: its window starts empty
    assert get_route(gateway.jobs, "w", "c").mode == "canary"
    _calls(gateway, mid, "canary", True, WINDOW)
    watch.judge(mid, "w", "c")
    assert get_route(gateway.jobs, "w", "c").mode == "live" and get_model(gateway.jobs, mid)["state"] == "live"
    steps = _route_changes(built)
    assert [(e["payload"]["mode"], e["payload"]["actor_role"], e["outcome"]) for e in steps] == [
        ("canary", "auto_promote", "success"), ("live", "auto_promote", "success")]
    assert all(e["payload"]["decision"]["allow"] and e["payload"]["live"]["ci"][0] >= 0.9 for e in steps)
    assert verify(built.audit_store).ok


def test_without_auto_promote_a_good_window_stays_where_the_operator_put_it(watched):
    gateway, mid, _ = watched
    gateway.settings = gateway.settings.with_overrides({"gateway": {"auto_promote": False}})
    _put(gateway, mid, "shadow")
    _calls(gateway, mid, "shadow", True, WINDOW)
    assert live.LiveWatch(gateway).judge(mid, "w", "c")["allow"]
    assert get_route(gateway.jobs, "w", "c").mode == "shadow"


def test_a_promotion_the_policy_denies_is_audited_once_and_leaves_the_route(watched):
    gateway, mid, built = watched
    gateway.jobs.update_doc("models", mid, lambda doc: doc.update(accuracy_ratio=0.5))  # offline: not good enough
    _put(gateway, mid, "shadow")
    _calls(gateway, mid, "shadow", True, WINDOW)
    watch = live.LiveWatch(gateway)
    for _ in range(3):
        watch.judge(mid, "w", "c")
    assert get_route(gateway.jobs, "w", "c").mode == "shadow"
    denied = [e for e in _route_changes(built) if e["outcome"] == "denied"]
    assert len(denied) == 1 and "accuracy_below_threshold:0.5<0.9" in denied[0]["payload"]["decision"]["reasons"]


def test_a_model_that_disagrees_is_rolled_back_once_by_replicas_judging_together(watched, monkeypatch):
    gateway, mid, built = watched
    _put(gateway, mid, "live")
    _calls(gateway, mid, "live", False, 10)  # min_window: judged from the tenth call, not the fortieth
    watches = [live.LiveWatch(gateway) for _ in range(4)]  # four ingress replicas
    start, read, failed = threading.Barrier(len(watches)), threading.Barrier(len(watches)), []
    real_get_route = live.get_route

    def get_route_together(*args):  # every replica has read the live route before any changes it
        route = real_get_route(*args)
        read.wait(timeout=10)
        return route

    monkeypatch.setattr(live, "get_route", get_route_together)

    def judge(watch):
        start.wait()
        try:
            watch.judge(mid, "w", "c")
        except Exception as exc:  # noqa: BLE001 - a replica that lost the race must not fail: collected
            failed.append(exc)

    threads = [threading.Thread(target=judge, args=(w,)) for w in watches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failed and get_route(gateway.jobs, "w", "c").mode == "off"
    model = get_model(gateway.jobs, mid)
    assert model["state"] == "rolled_back" and "agreement_below_threshold" in model["history"][-1]["reason"]
    rollbacks = [e for e in _route_changes(built) if e["type"] == "rollback"]
    assert len(rollbacks) == 1 and gateway.metrics.rollbacks.values == [1.0]
    assert verify(built.audit_store).ok


def test_a_jobs_report_stands_its_candidates_beside_the_model_serving_live(watched):
    from train.report import live_view
    from train.report_view import live_section

    gateway, mid, _ = watched
    assert live_view(gateway.settings, "w", "c") is None  # the upstream answers alone: nothing to stand beside
    _put(gateway, mid, "live")
    _calls(gateway, mid, "live", True, 12)
    _calls(gateway, mid, "live", False, 4)
    live = live_view(gateway.settings, "w", "c")
    assert (live["model"], live["mode"], live["trained_by_job"], live["offline_accuracy_ratio"]) == (
        mid, "live", "job1", 0.95)
    assert live["n"] == 16 and live["agreement"] == 0.75 and live["ci"][0] < 0.75 < live["ci"][1]
    (text,) = [line for line in live_section({"live": live}) if line.startswith("The gateway")]
    assert f"`{mid}` (live), trained by job `job1`" in text and "0.75 [" in text and "over 16 compared calls" in text
