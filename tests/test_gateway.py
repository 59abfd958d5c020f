"""The loop closed: a real job's customized model, registered, served on Ray Serve behind the gateway.

One job (the tiny model, DP-LoRA) trains and registers a model; an app of its own on the session's
Serve instance fronts a local OpenAI-compatible upstream (tests/openai_upstream.py). The official
`openai` client (sync, async, streaming) calls it in each mode; every call must be in GET /v1/logs
exactly once, named by who answered.
"""
from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import httpx
import openai
import pytest

from ray_app.registry import get_model, list_models, register
from ray_app.storage import open_job_store, open_log_store
from tests.conftest import ADMIN_KEY
from tests.openai_upstream import Upstream
from tests.test_flywheel_job import CLIENT, WORKLOAD, load, make_settings
from tests.workloads import TOOLS, customer_service_records

QUESTION = [{"role": "user", "content": "Where is my order 1234? It was due yesterday."}]


@pytest.fixture(scope="module")
def upstream():
    with Upstream() as up:
        yield up


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, ray_session):
    """A real job on the tiny model: its customized candidate lands in the registry."""
    from train.flywheel_job import run_job

    root = tmp_path_factory.mktemp("gateway")
    settings = make_settings(root, [tiny_model], governance={"thresholds": {"tool_calling": 0.0}})
    load(settings, customer_service_records(48, seed=2))
    report = run_job(settings, workload_id=WORKLOAD, client_id=CLIENT)
    return settings, report


@pytest.fixture(scope="module")
def gateway(trained, upstream, app_url):
    from ray import serve

    from ray_app.demo import wait_healthy
    from serve.launch import deploy

    settings, _ = trained
    settings = settings.with_overrides({"admin_key": ADMIN_KEY, "jobs": {"launch": False, "auto_trigger": False},
                                        "gateway": {"upstream_url": upstream.url, "timeout_s": 5.0, "mirror": 0.5,
                                                    "route_cache_s": 0.0, "window_size": 20, "min_window": 5,
                                                    "model_num_cpus": 0.5}})
    url = deploy(settings, port=urlparse(app_url).port, name="gateway", route_prefix="/gw")
    wait_healthy(url, timeout=90)
    yield settings, url
    serve.delete("gateway")


def client(url: str, workload: str = WORKLOAD, cls=openai.OpenAI):
    return cls(base_url=f"{url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=60,
               default_headers={"X-Flywheel-Workload-Id": workload, "X-Flywheel-Client-Id": CLIENT})


def ask(c: openai.OpenAI, **kw):
    raw = c.chat.completions.with_raw_response.create(model="gpt-big", messages=QUESTION, tools=TOOLS, **kw)
    return raw.headers["x-flywheel-model"], raw.parse()


def route(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/routes", json={"workload_id": WORKLOAD, "client_id": CLIENT, **body},
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=300)


def logged(settings, n_before: int) -> list[dict]:
    return open_log_store(settings).query(workload_id=WORKLOAD, client_id=CLIENT, limit=10_000)[:-n_before or None]


def test_a_job_registers_its_customized_model(trained):
    settings, report = trained
    [model] = list_models(open_job_store(settings))
    assert model["job_id"] == report["job_id"] and model["state"] == "registered"
    assert Path(model["adapter"], "adapter_config.json").exists()
    assert str(settings.data_dir / "models" / "registry") in model["adapter"]  # not the job's folder
    assert 0 < model["privacy"]["epsilon"] <= 8.0 + 1e-6
    assert model["training_data"]["splits"]["train"] == report["splits"]["train"]
    assert len(model["training_data"]["records_digest"]) == 64
    rec = report["recommendation"]
    assert model["promotion"]["recommended"] is (rec["eval_type"] == "customized")  # threshold 0: the cheapest
    assert model["scores"]["function_name_accuracy"] == model["accuracy_ratio"]


def test_models_list_in_openai_shape(gateway, trained):
    _, url = gateway
    listed = client(url).models.list()
    [model] = [m for m in listed.data if m.id.startswith("ft:")]
    assert model.object == "model" and model.owned_by == "flywheel" and model.model_extra["state"] == "registered"
    again = httpx.get(f"{url}/v1/models/{model.id}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert again["id"] == model.id and again["job_id"] == trained[1]["job_id"]
    missing = httpx.get(f"{url}/v1/models/ft:nope:0", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert missing.status_code == 404


MADE_HERE = ("over-budget", "smollm2-untrained")


def model_id(settings) -> str:
    """The trained job's model (the tests below register others beside it)."""
    return next(m["id"] for m in list_models(open_job_store(settings)) if m["job_id"] not in MADE_HERE)


OFFERED = {t["function"]["name"] for t in TOOLS}


def called_in(text: str | None, finish: str) -> str:
    """The tool an answer cut by its token budget began to call (the tiny model's strings run long)."""
    assert finish == "length" and text, (finish, text)
    return re.match(r'\{"name": "([^"]+)"', text).group(1)


def called(message, finish: str) -> str:
    """The tool a model's answer calls: schema-constrained, it must be one the request offered."""
    return message.tool_calls[0].function.name if message.tool_calls else called_in(message.content, finish)


def test_modes_end_to_end(gateway, upstream):
    settings, url = gateway
    mid = model_id(settings)
    before = len(logged(settings, 0))
    c = client(url)
    served = []

    who, answer = ask(c)  # off: the upstream answers
    assert who == "upstream" and answer.choices[0].message.tool_calls[0].function.name == TOOLS[0]["function"]["name"]
    served.append(who)

    assert route(url, model=mid, mode="shadow").status_code == 200
    for _ in range(3):
        served.append(ask(c)[0])
    assert served[-3:] == ["upstream"] * 3

    assert route(url, model=mid, mode="canary", weight=0.3).status_code == 200
    draws = [ask(c)[0] for _ in range(60)]
    served += draws
    k = draws.count(mid)
    assert abs(k - 18) <= 4 * math.sqrt(60 * 0.3 * 0.7), draws  # binomial(60, 0.3) within 4 sd
    sticky = {ask(c, user="user-7")[0] for _ in range(6)}
    served += [next(iter(sticky))] * 6
    assert len(sticky) == 1

    assert route(url, model=mid, mode="live").status_code == 200
    who, answer = ask(c)
    served.append(who)
    assert who == mid and answer.model == mid
    assert called(answer.choices[0].message, answer.choices[0].finish_reason) in OFFERED
    stream = c.chat.completions.create(model="gpt-big", messages=QUESTION, tools=TOOLS, stream=True)
    chunks = list(stream)
    served.append(mid)
    calls = [d for chunk in chunks for d in (chunk.choices[0].delta.tool_calls or [])]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    finish = chunks[-1].choices[0].finish_reason
    assert (calls[0].function.name if calls else called_in(text, finish)) in OFFERED

    async def concurrently():
        ac = client(url, cls=openai.AsyncOpenAI)
        return await asyncio.gather(*(ac.chat.completions.create(model="gpt-big", messages=QUESTION, tools=TOOLS)
                                      for _ in range(6)))
    answers = asyncio.run(concurrently())
    served += [mid] * 6
    assert {a.model for a in answers} == {mid}

    assert route(url, mode="off").status_code == 200
    model = get_model(open_job_store(settings), mid)  # taken off live: retired, every step in its history
    assert [h["state"] for h in model["history"]][-4:] == ["shadow", "canary", "live", "retired"]
    _every_call_logged_once(settings, before, served, mid)


def _every_call_logged_once(settings, before: int, served: list[str], mid: str) -> None:
    deadline = time.monotonic() + 30
    while len(records := logged(settings, before)) < len(served) and time.monotonic() < deadline:
        time.sleep(0.2)
    records = logged(settings, before)
    assert len(records) == len(served) and len({r["id"] for r in records}) == len(served)
    assert sorted(r["served_by"] for r in records) == sorted(served)
    shadows = [r for r in records if r["route"]["mode"] == "shadow"]
    assert len(shadows) == 3 and all(r["shadow"]["served_by"] == mid and r["shadow"]["response"] for r in shadows)
    assert all(r["constitutional_hash"] for r in records)
    mirrored = [r for r in records if r["route"]["mode"] == "live" and r.get("shadow")]
    assert all(r["shadow"]["served_by"] == "upstream" for r in mirrored)


def test_a_denied_promotion_leaves_the_route_unchanged(gateway):
    settings, url = gateway
    store = open_job_store(settings)
    good = get_model(store, model_id(settings))
    job = {"id": "over-budget", "workload_id": WORKLOAD, "client_id": CLIENT}
    bad = register(store, data_dir=settings.data_dir, job=job, base_model=good["base_model"],
                   adapter=Path(good["adapter"]), workload_type="tool_calling", train_ids=["r1"],
                   splits=good["training_data"]["splits"], training={**good["training"], "epsilon": 50.0},
                   scores=good["scores"], accuracy_ratio=good["accuracy_ratio"], promotion=None)
    assert route(url, model=good["id"], mode="shadow").status_code == 200
    denied = route(url, model=bad["id"], mode="live")
    assert denied.status_code == 403 and "epsilon_above_limit" in denied.text
    routes = httpx.get(f"{url}/v1/routes", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["routes"]
    mine = next(r for r in routes if r["workload_id"] == WORKLOAD)
    assert (mine["model"], mine["mode"]) == (good["id"], "shadow")
    assert route(url, model="ft:no-such:model", mode="shadow").status_code == 404
    assert route(url, mode="off").status_code == 200


def test_faults_fall_back_or_name_the_upstream(gateway, upstream):
    settings, url = gateway
    c = client(url)
    upstream.mode = "down"
    try:
        with pytest.raises(openai.InternalServerError) as down:  # off: nobody else can answer
            ask(c)
        assert down.value.status_code == 502 and upstream.url in down.value.message
        assert route(url, model=model_id(settings), mode="canary", weight=0.0).status_code == 200
        assert ask(c)[0] == model_id(settings)  # the upstream's share falls back to the model
    finally:
        upstream.mode = "ok"
    from ray import serve

    from serve.model_server import app_name

    serve.delete(app_name(model_id(settings)))  # the model's replicas gone: the upstream answers
    assert route(url, model=model_id(settings), mode="canary", weight=1.0).status_code == 200
    serve.delete(app_name(model_id(settings)))
    assert ask(c)[0] == "upstream"
    assert route(url, mode="off").status_code == 200


@pytest.mark.parametrize("body,field", [
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
])
def test_malformed_requests_name_the_field(gateway, body, field):
    _, url = gateway
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers={
        "Authorization": f"Bearer {ADMIN_KEY}", "X-Flywheel-Workload-Id": "w-" + uuid.uuid4().hex[:6],
        "X-Flywheel-Client-Id": CLIENT})
    assert response.status_code == 422 and response.json()["error"]["param"] == field  # OpenAI's error shape


def test_smollm2_served_beside_the_upstream_writes_valid_calls(gateway, tmp_path_factory):
    """A real small model behind the gateway: in shadow its answers are schema-valid calls to offered tools.
    (Its LoRA is untrained, B = 0: what is checked is serving SmolLM2, not what training taught it.)"""
    import json

    from peft import LoraConfig, get_peft_model

    from evals.models import load_model

    settings, url = gateway
    base, _ = load_model("smollm2-135m", settings.data_dir)
    folder = tmp_path_factory.mktemp("smollm2-adapter")
    get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    entry = register(open_job_store(settings), data_dir=settings.data_dir, base_model="smollm2-135m", adapter=folder,
                     job={"id": "smollm2-untrained", "workload_id": WORKLOAD, "client_id": CLIENT},
                     workload_type="tool_calling", train_ids=[], splits={}, training={}, scores={},
                     accuracy_ratio=None, promotion=None, max_new_tokens=48)
    assert route(url, model=entry["id"], mode="shadow").status_code == 200
    before = len(logged(settings, 0))
    assert ask(client(url))[0] == "upstream"
    deadline = time.monotonic() + 120
    while not (new := logged(settings, before)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert route(url, mode="off").status_code == 200
    [record] = new
    message = record["shadow"]["response"]["choices"][0]["message"]
    call = message["tool_calls"][0]["function"]
    tool = next(t["function"] for t in TOOLS if t["function"]["name"] == call["name"])
    assert set(tool["parameters"]["required"]) <= set(json.loads(call["arguments"]))


def test_cli_lists_models_and_deploys_a_jobs_model(gateway, trained):
    import os
    import subprocess
    import sys

    settings, url = gateway
    env = {**os.environ, "FLYWHEEL_DATA_DIR": str(settings.data_dir)}
    cli = [sys.executable, "-m", "ray_app.cli"]
    listed = subprocess.run([*cli, "models", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and model_id(settings) in listed.stdout, listed.stderr
    job_id = trained[1]["job_id"]
    deployed = subprocess.run([*cli, "deploy", job_id, "--mode", "shadow", "--url", url, "--api-key", ADMIN_KEY],
                              env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0 and f"{model_id(settings)} now shadow" in deployed.stdout, deployed.stderr
    assert get_model(open_job_store(settings), model_id(settings))["state"] == "shadow"
    unknown = subprocess.run([*cli, "deploy", "no-such-job", "--mode", "live", "--url", url], env=env,
                             capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 1 and "neither a registered model nor a job" in unknown.stderr
    assert route(url, mode="off").status_code == 200
    audit = httpx.get(f"{url}/v1/audit", params={"limit": 10_000},
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["entries"]
    changes = [e["event"]["payload"] for e in audit if e["event"]["type"] == "route_change"]
    assert {"shadow", "off"} <= {c["mode"] for c in changes}  # every route change is on the audit chain


def test_workload_from_metadata_and_a_slow_upstream(gateway, upstream):
    settings, url = gateway
    plain = openai.OpenAI(base_url=f"{url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=60)
    workload = "w-meta-" + uuid.uuid4().hex[:6]
    raw = plain.chat.completions.with_raw_response.create(
        model="gpt-big", messages=QUESTION, metadata={"workload_id": workload, "client_id": CLIENT})
    assert raw.headers["x-flywheel-model"] == "upstream"
    upstream.mode, upstream.delay = "slow", 7.0  # over the gateway's timeout_s of 5
    try:
        with pytest.raises(openai.APIStatusError) as slow:
            plain.chat.completions.create(model="gpt-big", messages=QUESTION,
                                          metadata={"workload_id": workload, "client_id": CLIENT})
        assert slow.value.status_code == 504 and "did not answer in time" in slow.value.message
    finally:
        upstream.mode = "ok"
    logs = open_log_store(settings)
    deadline = time.monotonic() + 20
    while not logs.count(workload, CLIENT) and time.monotonic() < deadline:
        time.sleep(0.2)
    [record] = logs.query(workload_id=workload, client_id=CLIENT)
    assert "metadata" not in record["request"]  # Flywheel's own keys never travel upstream or into the log


def test_calls_wait_out_a_store_that_is_down(tmp_path):
    """The gateway's log writer keeps records, in order, while the store answers 503, then writes them."""
    from concurrent.futures import ThreadPoolExecutor

    from ray_app.config import Settings
    from ray_app.errors import StoreUnavailable
    from ray_app.ingest import Ingest
    from ray_app.storage.sqlite import SQLiteLogStore
    from serve.call_log import CallLog

    class Flaky(SQLiteLogStore):
        down = 3

        def put_many(self, records):
            if self.down:
                self.down -= 1
                raise StoreUnavailable("store restarting", retry_after=0.05)
            return super().put_many(records)

    store = Flaky(str(tmp_path / "logs.db"))
    stored = []
    log = CallLog(Ingest(Settings(data_dir=tmp_path)), store, ThreadPoolExecutor(1),
                  on_stored=lambda records, new, pii: stored.append(new))
    for i in range(5):
        log.put({"id": f"gw-{i}", "workload_id": "w", "client_id": "c", "served_by": "upstream",
                 "request": {"messages": [{"role": "user", "content": f"call {i}, mail me at a.b@example.com"}]},
                 "response": {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]}})
    assert log.drain(timeout=20)
    assert store.down == 0 and log.retries == 3 and sum(stored) == 5
    texts = [r["request"]["messages"][0]["content"] for r in store.query(workload_id="w", client_id="c")]
    assert len(texts) == 5 and not any("a.b@example.com" in t for t in texts)  # scrubbed at the door


def test_with_auto_promote_the_served_model_climbs_to_live_on_its_own(gateway, app_url):
    """Through Serve: the app deployed with `gateway.auto_promote`, a model put in shadow reaches canary and
    then live with nothing but traffic, each step a `route_change` by `auto_promote` in the audit chain."""
    from ray_app.demo import wait_healthy
    from serve.launch import deploy

    settings, url = gateway
    climbing = settings.with_overrides({"gateway": {"auto_promote": True, "canary_weight": 1.0}})
    assert deploy(climbing, port=urlparse(app_url).port, name="gateway", route_prefix="/gw") == url
    wait_healthy(url, timeout=90)
    mid, auth, c = model_id(settings), {"Authorization": f"Bearer {ADMIN_KEY}"}, client(url)
    assert route(url, model=mid, mode="shadow").status_code == 200
    seen, deadline = [], time.monotonic() + 300
    while (mode := _mode(url)) != "live" and time.monotonic() < deadline:
        seen.append(mode)
        ask(c)  # one call at a time: every shadow answer is scored, none skipped as busy
    assert mode == "live" and seen[0] == "shadow" and "canary" in seen
    audit = httpx.get(f"{url}/v1/audit", params={"limit": 10_000}, headers=auth).json()["entries"]
    steps = [e["event"]["payload"]["mode"] for e in audit if e["event"]["type"] == "route_change"
             and e["event"]["payload"].get("actor_role") == "auto_promote" and e["event"]["payload"]["model"] == mid]
    assert steps[-2:] == ["canary", "live"]
    assert httpx.get(f"{url}/v1/audit/verify", headers=auth).json()["ok"]


def test_a_restarted_app_keeps_routes_states_and_windows_and_serves_the_model_again(gateway, app_url):
    """Routes, model states and live windows live in the stores, not in the replicas: after the gateway's
    app and the model's own are both deleted and the app deployed again, the model is back where it was."""
    from ray import serve

    from ray_app.demo import wait_healthy
    from serve.launch import deploy
    from serve.model_server import app_name

    settings, url = gateway
    mid, auth = model_id(settings), {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert route(url, model=mid, mode="shadow").status_code == 200
    assert route(url, model=mid, mode="live", mirror=1.0).status_code == 200
    assert all(ask(client(url))[0] == mid for _ in range(3))
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/v1/models/{mid}", headers=auth).json()["live"]["n"] < 3 and time.monotonic() < deadline:
        time.sleep(0.3)
    before = httpx.get(f"{url}/v1/models/{mid}", headers=auth).json()["live"]
    serve.delete("gateway")
    serve.delete(app_name(mid))
    assert deploy(settings, port=urlparse(app_url).port, name="gateway", route_prefix="/gw") == url
    wait_healthy(url, timeout=90)
    deadline = time.monotonic() + 180  # the app deploys every routed model again as it starts
    while (getattr(serve.status().applications.get(app_name(mid)), "status", None) != "RUNNING"
           and time.monotonic() < deadline):
        time.sleep(1)
    assert _mode(url) == "live" and get_model(open_job_store(settings), mid)["state"] == "live"
    after = httpx.get(f"{url}/v1/models/{mid}", headers=auth).json()["live"]
    assert after["n"] >= before["n"] >= 3 and after["window"] == before["window"]
    assert ask(client(url))[0] == mid  # answered by the model again, not by a fallback


def test_live_agreement_shows_and_a_failing_model_is_rolled_back(gateway):
    settings, url = gateway
    mid, c = model_id(settings), client(url)
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert route(url, model=mid, mode="shadow").status_code == 200  # whatever state earlier tests left it in
    assert route(url, model=mid, mode="live", mirror=1.0).status_code == 200
    for _ in range(3):
        assert ask(c)[0] == mid  # each mirrored to the upstream and scored against its answer
    deadline = time.monotonic() + 30
    while (live := httpx.get(f"{url}/v1/models/{mid}", headers=auth).json()["live"])["n"] < 3 \
            and time.monotonic() < deadline:
        time.sleep(0.3)
    assert live["n"] >= 3 and 0.0 <= live["agreement"] <= 1.0 and live["ci"][0] <= live["agreement"] <= live["ci"][1]
    assert live["window"] == 20 and live["error_rate"] <= 0.05  # earlier tests here made it fail once at most

    from ray import serve

    from serve.model_server import app_name

    serve.delete(app_name(mid))  # the model's replicas die: callers still get answers, the model's window fails
    deadline = time.monotonic() + 60
    while (mode := _mode(url)) != "off" and time.monotonic() < deadline:
        assert ask(c)[0] == "upstream"
        time.sleep(0.2)
    assert mode == "off"
    model = get_model(open_job_store(settings), mid)
    assert model["state"] == "rolled_back" and "error_rate_above_bound" in model["history"][-1]["reason"]
    audit = httpx.get(f"{url}/v1/audit", params={"limit": 10_000}, headers=auth).json()["entries"]
    assert any(e["event"]["type"] == "rollback" and e["event"]["payload"]["model"] == mid for e in audit)
    assert "flywheel_rollbacks_total" in httpx.get(f"{url}/metrics", headers=auth).text


def _mode(url: str) -> str:
    routes = httpx.get(f"{url}/v1/routes", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["routes"]
    return next(r["mode"] for r in routes if r["workload_id"] == WORKLOAD)
