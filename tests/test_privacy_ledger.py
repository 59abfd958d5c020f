"""The privacy ledger: RDP composition over runs, the budget in the training approval, the CLI and /metrics."""
from __future__ import annotations

import re
import time

import httpx
import pytest
from opacus.accountants import RDPAccountant

from ray_app import privacy
from ray_app.cli import main
from ray_app.config import Settings
from ray_app.schemas import Job
from ray_app.storage import open_audit_store, open_job_store
from tests.conftest import ADMIN_KEY
from tests.test_flywheel_job import CLIENT, WORKLOAD, load, make_settings
from tests.workloads import customer_service_records
from train import gates
from train.flywheel_job import run_job

RUNS = [(1.1, 0.05, 300), (0.9, 0.1, 120), (2.0, 0.02, 1000)]


def _record(store, runs, workload_id="w", client_id="c"):
    for i, (noise, rate, steps) in enumerate(runs):
        privacy.record_run(store, workload_id=workload_id, client_id=client_id, job_id=f"j{i}", model="m",
                           noise_multiplier=noise, sample_rate=rate, steps=steps, delta=1e-5)


def test_ledger_composition_equals_an_independent_accountant(tmp_path):
    store = open_job_store(Settings(data_dir=tmp_path))
    _record(store, RUNS)
    independent = RDPAccountant()
    for noise, rate, steps in RUNS:  # step by step, as the DP optimizer drives it
        for _ in range(steps):
            independent.step(noise_multiplier=noise, sample_rate=rate)
    ledger = privacy.read_ledger(store, "w", "c")
    info = privacy.summary(ledger, privacy.record_sets(store, ledger), delta=1e-5, budget_epsilon=10.0)
    assert info["runs"] == 3
    assert info["epsilon_spent"] == pytest.approx(independent.get_epsilon(1e-5), rel=1e-9)
    assert info["budget_remaining"] == pytest.approx(10.0 - info["epsilon_spent"])
    alone = [privacy.composed_epsilon([r], 1e-5) for r in RUNS]
    assert max(alone) < info["epsilon_spent"] < sum(alone)  # composition is tighter than adding
    assert privacy.ledger_keys(store) == [("w", "c")]


def test_runs_on_disjoint_records_compose_in_parallel_and_reused_records_add_up(tmp_path):
    store = open_job_store(Settings(data_dir=tmp_path))
    a, b = [f"a{i}" for i in range(10)], [f"b{i}" for i in range(10)]
    run = RUNS[0]

    def spent():
        ledger = privacy.read_ledger(store, "w", "c")
        return privacy.summary(ledger, privacy.record_sets(store, ledger), delta=1e-5, budget_epsilon=None)

    for ids in (a, b):
        privacy.record_run(store, workload_id="w", client_id="c", job_id="j", model="m", noise_multiplier=run[0],
                           sample_rate=run[1], steps=run[2], delta=1e-5, record_ids=ids)
    alone, twice = privacy.composed_epsilon([run], 1e-5), privacy.composed_epsilon([run, run], 1e-5)
    assert spent()["epsilon_spent"] == pytest.approx(alone) and spent()["records"] == 20  # disjoint: parallel
    privacy.record_run(store, workload_id="w", client_id="c", job_id="j", model="m", noise_multiplier=run[0],
                       sample_rate=run[1], steps=run[2], delta=1e-5, record_ids=[a[0], "c0"])
    assert spent()["epsilon_spent"] == pytest.approx(twice)  # a0 took part in two runs: they add up for it
    ledger = privacy.read_ledger(store, "w", "c")
    sets = privacy.record_sets(store, ledger)
    assert privacy.fresh_ids([*a, "new"], sets) == ["new"]
    now, after = privacy.prospective_epsilon(ledger, sets, run, ["new", "c0"], delta=1e-5)
    assert now == pytest.approx(twice) and after == pytest.approx(twice)  # c0's second run: still below a0's
    assert privacy.prospective_epsilon(ledger, sets, run, [a[0]], delta=1e-5)[1] == pytest.approx(
        privacy.composed_epsilon([run] * 3, 1e-5))
    _record(store, [run])  # a run that named no records counts against every record: nothing is fresh
    assert privacy.fresh_ids(["new"], privacy.record_sets(store, privacy.read_ledger(store, "w", "c"))) == []


def test_over_budget_a_retrain_uses_only_records_no_earlier_run_used(tmp_path):
    settings = Settings(data_dir=tmp_path, training={"privacy": {"budget_epsilon": 10.0}})
    store = open_job_store(settings)
    used = [{"id": f"u{i}"} for i in range(40)]
    new = [{"id": f"n{i}"} for i in range(40)]
    privacy.record_run(store, workload_id="w", client_id="c", job_id="j0", model="m", noise_multiplier=0.7477,
                       sample_rate=0.25, steps=4, delta=1e-5, record_ids=[r["id"] for r in used])  # worth ~8
    records, budget = gates.within_budget(settings, workload_id="w", client_id="c", records=used + new)
    assert records == new and budget["limited_to_fresh"] and budget["after"] <= 10.0 and budget["fresh"] == 40
    records, budget = gates.within_budget(settings, workload_id="w", client_id="c", records=used)
    assert records == used and budget["after"] > 10.0 and "0 of the 40 training records" in gates.budget_note(budget)
    fits, budget = gates.within_budget(settings.with_overrides({"training": {"privacy": {"budget_epsilon": 30.0}}}),
                                       workload_id="w", client_id="c", records=used + new)
    assert fits == used + new and not budget.get("limited_to_fresh")  # within budget: every record


def test_privacy_show_prints_spent_and_remaining(tmp_path, monkeypatch, capsys):
    store = open_job_store(Settings(data_dir=tmp_path))
    _record(store, RUNS[:2])
    _record(store, RUNS[2:], workload_id="other")
    config = tmp_path / "c.yaml"
    config.write_text("training: {privacy: {budget_epsilon: 50.0}}\n")
    none = tmp_path / "none.yaml"
    none.write_text("training: {privacy: {budget_epsilon: null}}\n")
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path))
    expected = privacy.composed_epsilon(RUNS[:2], 1e-5)
    assert main(["privacy", "show", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"w/c: 2 DP runs, epsilon spent {expected:.3f} at delta 1e-05; budget 50, "
                        f"remaining {50 - expected:.3f}")
    assert lines[1].startswith("other/c: 1 DP runs") and len(lines) == 2
    assert main(["privacy", "show", "--workload-id", "w", "--client-id", "c", "--config", str(none)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "no budget set" in out[0] and out[1].startswith("  job j0 m: noise 1.1000, sample rate 0.0500, 300 steps")
    assert main(["privacy", "show", "--workload-id", "nobody", "--client-id", "c"]) == 0
    assert capsys.readouterr().out.startswith("nobody/c: 0 DP runs, epsilon spent 0.000")


def test_a_run_over_the_budget_is_refused_before_training(tmp_path, tiny_model, ray_session):
    # A run alone reaches epsilon 8 (< budget 10); composed with the earlier run it would not fit.
    s = make_settings(tmp_path, [tiny_model])
    s = s.with_overrides({"training": {"privacy": {"budget_epsilon": 10.0}}})
    load(s, customer_service_records(48, seed=2))
    store = open_job_store(s)
    _record(store, [(0.7477, 0.25, 4)], workload_id=WORKLOAD, client_id=CLIENT)  # an earlier run worth ~8
    report = run_job(s, workload_id=WORKLOAD, client_id=CLIENT)
    (cand,) = report["candidates"]
    assert cand["status"] == "failed" and (cand["training"] or {}).get("epsilon") is None
    evaluations = {k: v for k, v in cand["evaluations"].items() if v}  # the report lists every eval type
    assert set(evaluations) == {"base", "icl"} and evaluations["base"]["n"] == 8
    error = cand["error"]
    assert "\n" not in error and "privacy_budget_exhausted" in error
    assert re.search(r"composed epsilon would be (\d+\.\d+) > privacy.budget_epsilon 10.0 \(spent 7\.99\d over 1 "
                     r"earlier runs; 0 of the \d+ training records unused by them\)", error)
    assert len(privacy.read_ledger(store, WORKLOAD, CLIENT)["runs"]) == 1  # nothing was trained or spent
    decisions = [e["event"] for e in open_audit_store(s).entries() if e["event"]["type"] == "policy_decision"
                 and e["event"]["payload"]["job_id"] == report["job_id"]]
    (denial,) = decisions
    assert denial["outcome"] == "denied"
    assert denial["payload"]["inputs"]["privacy_budget"]["after"] > 10.0


def _value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _scrape_until(client: httpx.Client, ready, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout  # the collector caches its answer for a few seconds
    while True:
        text = client.get("/metrics").text
        if ready(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


@pytest.fixture()
def budget_app(app_url, settings):
    from urllib.parse import urlparse

    from ray import serve

    from serve.launch import deploy

    budgeted = settings.with_overrides({"training": {"privacy": {"budget_epsilon": 20.0}},
                                        "serve": {"ingest_replicas": 1}})
    url = deploy(budgeted, port=urlparse(app_url).port, name="flywheel-budget", route_prefix="/budget")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as client:
        yield client
    serve.delete("flywheel-budget")


def test_metrics_read_jobs_and_ledgers_from_the_store(api, budget_app, settings, workload_id):
    store = open_job_store(settings)
    before = _value(api.get("/metrics").text, "model_optimization_cycles_total", trigger_type="auto",
                    success="false") or 0.0
    stage = {"name": "smollm2-135m:train", "status": "completed", "started_at": 100.0, "finished_at": 103.5}
    for status in ("completed", "failed", "failed", "running"):
        job = store.create_job(Job(workload_id=workload_id, client_id="acme", trigger="auto",
                                   constitutional_hash=settings.governance.constitutional_hash).model_dump(mode="json"))
        store.update_job(job["id"], lambda j, status=status: j.update(status=status, started_at=100.0,
                                                                      finished_at=110.0, stages=[stage]))
    _record(store, RUNS[:2], workload_id=workload_id, client_id="acme")
    spent = privacy.composed_epsilon(RUNS[:2], settings.training.privacy.delta)
    text = _scrape_until(api, lambda t: _value(t, "privacy_epsilon_spent", workload_id=workload_id) is not None)
    assert "# TYPE model_optimization_cycles_total counter" in text
    assert _value(text, "model_optimization_cycles_total", trigger_type="auto", success="false") == before + 2
    assert _value(text, "model_optimization_cycles_total", trigger_type="auto", success="true") >= 1
    assert _value(text, "privacy_epsilon_spent", workload_id=workload_id, client_id="acme") == pytest.approx(spent)
    assert _value(text, "privacy_budget_remaining", workload_id=workload_id,  # the default budget, 14
                  client_id="acme") == pytest.approx(14.0 - spent)
    assert "flywheel_ingest_records" in text or "flywheel_ingest_latency_seconds" in text  # replicas' own still there
    # job and stage wall times from the same store (a candidate's step under its step name), and every request
    assert _value(text, "flywheel_job_duration_seconds_count", status="failed") >= 2
    assert _value(text, "flywheel_job_stage_duration_seconds_count", stage="train") >= 3
    assert _value(text, "flywheel_job_stage_duration_seconds_sum", stage="train") >= 3 * 3.5
    assert _value(text, "flywheel_http_requests_total", route="/metrics", method="GET", status="200") >= 1
    budget_text = _scrape_until(budget_app, lambda t: _value(t, "privacy_budget_remaining",
                                                             workload_id=workload_id) is not None)
    assert "# TYPE privacy_budget_remaining gauge" in budget_text
    assert _value(budget_text, "privacy_budget_remaining", workload_id=workload_id,
                  client_id="acme") == pytest.approx(20.0 - spent)
