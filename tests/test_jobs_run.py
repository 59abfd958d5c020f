"""Jobs through the real path: POST /v1/jobs and the automatic trigger submit `flywheel run` as a
Ray job (Jobs API), which runs to the end and reports through GET /v1/jobs/{id}. Tiny model."""
from __future__ import annotations

import time
from urllib.parse import urlparse

import httpx
import pytest
from ray.job_submission import JobSubmissionClient

from ray_app.launcher import jobs_address
from tests.conftest import ADMIN_KEY
from tests.workloads import customer_service_records


@pytest.fixture(scope="module")
def jobs_app(ray_session, app_url, settings, tiny_model, tmp_path_factory):
    from ray import serve

    from serve.launch import deploy

    launching = settings.with_overrides({
        "data_dir": str(tmp_path_factory.mktemp("jobs-app")),
        "jobs": {"launch": True, "auto_trigger": True, "retrigger_every": 1000},
        "data_split": {"eval_size": 8, "val_ratio": 0.1, "min_total_records": 30, "random_seed": 1},
        "icl_config": {"example_selection": "uniform_distribution", "max_examples": 2},
        "candidates": [{"model": tiny_model}],
        "training": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "checkpoint_every": 2},
    })
    url = deploy(launching, port=urlparse(app_url).port, name="flywheel-jobs", route_prefix="/jobs")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as client:
        _until(lambda: client.get("/healthz").status_code == 200, 60)
        yield client, launching
    serve.delete("flywheel-jobs")


def _until(ok, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"not done within {timeout} s")


def _finished(api, job_id: str, timeout: float = 240) -> dict:
    state = {}

    def done() -> bool:
        state.update(api.get(f"/v1/jobs/{job_id}").json())
        return state["status"] in ("completed", "failed", "cancelled")
    _until(done, timeout)
    return state


def _dying_driver(settings):
    """Settings whose driver dies before it can record anything: a job store it cannot open."""
    return settings.model_copy(update={"job_store": "nosuch://x"})


def _created_ago(store, job: dict, seconds: float) -> None:
    store.update_job(job["id"], lambda doc: doc.update(created_at=doc["created_at"] - seconds))


def test_post_jobs_runs_a_ray_job_to_the_end(jobs_app):
    api, settings = jobs_app
    records = customer_service_records(25, seed=5, workload_id="api-started")  # under the trigger's 30
    api.post("/v1/logs", json={"records": records})
    job = api.post("/v1/jobs", json={"workload_id": "api-started", "client_id": "acme",
                                     "config": {"data_split": {"min_total_records": 20}}}).json()
    state = _finished(api, job["id"])
    assert state["status"] == "completed", state.get("error")
    names = [s["name"] for s in state["stages"]]
    assert names[0] == "curate" and names[-2:] == ["report", "register"]
    assert all(s["status"] == "completed" for s in state["stages"])
    assert state["evaluations"] and state["trainings"]
    ray_jobs = JobSubmissionClient(jobs_address())
    _until(lambda: ray_jobs.get_job_status(state["ray_submission_id"]).is_terminal(), 60)  # the driver exits
    info = ray_jobs.get_job_info(state["ray_submission_id"])
    assert info.status == "SUCCEEDED" and f"--job-id {job['id']}" in info.entrypoint
    assert (settings.data_dir / "reports" / job["id"] / "report.json").exists()


def test_automatic_trigger_starts_one_job_when_a_workload_crosses_the_threshold(jobs_app):
    api, _ = jobs_app
    records = customer_service_records(45, seed=6, workload_id="auto-started")
    for start in range(0, 45, 15):  # 15, 30 (crosses min_total_records=30), 45
        assert api.post("/v1/logs", json={"records": records[start:start + 15]}).status_code == 200
        time.sleep(1.1)  # the trigger counts a workload at most once a second per replica
    _until(lambda: api.get("/v1/jobs", params={"workload_id": "auto-started"}).json()["jobs"], 30)
    jobs = api.get("/v1/jobs", params={"workload_id": "auto-started"}).json()["jobs"]
    assert len(jobs) == 1 and jobs[0]["trigger"] == "auto"
    state = _finished(api, jobs[0]["id"])
    assert state["status"] == "completed", state.get("error")


def test_unknown_workload_job_fails_with_a_reason(jobs_app):
    api, _ = jobs_app
    job = api.post("/v1/jobs", json={"workload_id": "never-seen", "client_id": "acme"}).json()
    state = _finished(api, job["id"], timeout=120)
    assert state["status"] == "failed" and "no records for workload 'never-seen'" in state["error"]


def test_a_ray_job_that_dies_marks_its_job_failed(jobs_app):
    """A driver that crashes before it can record anything (here: a config it cannot load) must
    not leave the job pending forever: GET /v1/jobs/{id} reconciles it with the Ray job."""
    api, app_settings = jobs_app
    from ray_app.jobs import create_job
    from ray_app.launcher import submit_flywheel_job
    from ray_app.storage import open_job_store

    store = open_job_store(app_settings)
    job = create_job(app_settings, store, workload_id="w", client_id="c")
    submission = submit_flywheel_job(_dying_driver(app_settings), job)
    store.update_job(job["id"], lambda d: d.update(ray_submission_id=submission))
    state = _finished(api, job["id"], timeout=120)
    assert state["status"] == "failed"
    assert state["error"].startswith(f"Ray job {submission} ended FAILED")


def test_a_job_its_creator_stopped_before_submitting_fails_and_one_submitted_unrecorded_is_found(jobs_app):
    """The replica that creates a job can stop before it submits it, or after submitting but before
    recording the submission. GET /v1/jobs/{id} finds the Ray job by the id it is always given, and
    the list settles the jobs it shows."""
    from ray_app.jobs import create_job
    from ray_app.launcher import reconcile, submit_flywheel_job
    from ray_app.storage import open_job_store

    api, app_settings = jobs_app
    store = open_job_store(app_settings)
    lost, fresh, unrecorded = (create_job(app_settings, store, workload_id="w", client_id="c") for _ in range(3))
    by_cli = create_job(app_settings, store, workload_id="w", client_id="c", trigger="cli")
    for job in (lost, by_cli):
        _created_ago(store, job, 600)
    assert reconcile(store, store.get_job(fresh["id"]))["status"] == "pending"  # may still be being submitted
    assert reconcile(store, store.get_job(by_cli["id"]))["status"] == "pending"  # `flywheel run` drives it
    pending = api.get("/v1/jobs", params={"workload_id": "w", "status": "pending"}).json()["jobs"]
    assert lost["id"] not in {j["id"] for j in pending} and fresh["id"] in {j["id"] for j in pending}
    state = api.get(f"/v1/jobs/{lost['id']}").json()
    assert state["status"] == "failed", state
    assert state["error"].startswith(f"never submitted: no Ray job flywheel-{lost['id']} 60")  # ~600 s old

    submission = submit_flywheel_job(_dying_driver(app_settings), unrecorded)  # never recorded on the job
    state = _finished(api, unrecorded["id"], timeout=120)
    assert state["ray_submission_id"] == submission == f"flywheel-{unrecorded['id']}"
    assert state["status"] == "failed" and state["error"].startswith(f"Ray job {submission} ended FAILED")


def test_a_stuck_job_no_longer_holds_back_the_automatic_trigger(jobs_app):
    """A job that never ends (here: its creator stopped before submitting it) would keep its workload
    from ever being triggered again. The trigger reconciles a due workload's old active job in the
    background; once that has failed it, the next batch starts a new job."""
    from ray_app.jobs import create_job
    from ray_app.storage import open_job_store

    api, app_settings = jobs_app
    store = open_job_store(app_settings)
    stuck = create_job(app_settings, store, workload_id="stuck", client_id="acme", trigger="auto")
    _created_ago(store, stuck, 600)
    records = iter(customer_service_records(100, seed=7, workload_id="stuck"))
    api.post("/v1/logs", json={"records": [next(records) for _ in range(35)]})  # over the trigger's 30

    def new_job() -> list[dict]:
        api.post("/v1/logs", json={"records": [next(records)]})  # a fresh record: the trigger looks again
        jobs = api.get("/v1/jobs", params={"workload_id": "stuck"}).json()["jobs"]
        return [j for j in jobs if j["id"] != stuck["id"]]
    _until(new_job, 60)
    assert store.get_job(stuck["id"])["error"].startswith(f"never submitted: no Ray job flywheel-{stuck['id']}")
    started = new_job()
    assert len(started) == 1 and started[0]["trigger"] == "auto"
    assert _finished(api, started[0]["id"])["status"] == "completed"


def test_a_job_that_cannot_be_submitted_fails_with_the_reason(settings, tmp_path, monkeypatch):
    """Submission runs in the background of the replica that created the job, where nobody awaits
    it: whatever stops it must end up on the job (failed, with the reason) and in the audit trail.
    A Ray without a dashboard (nothing at the Jobs API's address) used to leave the job pending."""
    from ray_app.governance.audit import AuditLog
    from ray_app.jobs import create_job
    from ray_app.launcher import launch
    from ray_app.storage import open_audit_store, open_job_store
    from tests.standin_ingest import free_port

    local = settings.with_overrides({"data_dir": str(tmp_path)})
    store, audit_store = open_job_store(local), open_audit_store(local)
    audit = AuditLog(audit_store, constitutional_hash=local.governance.constitutional_hash, sample_rate=1.0)
    nowhere = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr("ray_app.launcher.jobs_address", lambda: nowhere)
    unreachable = create_job(local, store, workload_id="w", client_id="c")
    launch(local, store, audit, unreachable)

    def broken_env(_settings):  # a fault of our own (say, a bug) while preparing the submission
        raise KeyError("FLYWHEEL_CONFIG")
    monkeypatch.setattr("ray_app.launcher.job_env", broken_env)
    buggy = create_job(local, store, workload_id="w2", client_id="c")
    launch(local, store, audit, buggy)

    first, second = store.get_job(unreachable["id"]), store.get_job(buggy["id"])
    assert first["status"] == second["status"] == "failed"
    assert f"through the Jobs API at {nowhere}: " in first["error"] and "docs/ray.md" in first["error"]
    assert second["error"] == f"cannot submit Ray job for {buggy['id']}: KeyError('FLYWHEEL_CONFIG')"
    failures = [e["event"]["payload"] for e in audit_store.entries() if e["event"]["outcome"] == "failure"]
    assert [(p["job_id"], p["stage"]) for p in failures] == [(unreachable["id"], "submit"), (buggy["id"], "submit")]
