"""The one stage runner (train/jobstate.py `JobRecorder.run_stage`), the job's and each candidate's:
reuse an earlier run's output, refuse a cancelled job, record a failure (as cancelled when the job
was), write the output before the stage says completed. On the embedded job and audit stores."""
from __future__ import annotations

import json

import pytest

from ray_app import governance
from ray_app.config import Settings
from ray_app.errors import JobCancelled, JobFailed
from ray_app.governance.audit import verify
from ray_app.schemas import Job, JobStatus
from ray_app.storage import open_job_store
from train.jobstate import JobRecorder


@pytest.fixture
def recorder(tmp_path):
    settings = Settings(data_dir=tmp_path, governance={"audit_sample_rate": 1.0})  # every routine entry kept
    store = open_job_store(settings)
    job = store.create_job(Job(workload_id="w", client_id="c").model_dump(mode="json"))
    lines: list[str] = []
    built = governance.from_settings(settings)
    return JobRecorder(store, job["id"], built.audit, say=lines.append), lines, built


def test_a_stage_runs_once_and_a_rerun_reuses_its_output(recorder, tmp_path):
    rec, lines, built = recorder
    calls, published = [], []

    def work():
        calls.append(1)
        return {"n": len(calls)}

    out = tmp_path / "out" / "curate.json"
    first = rec.run_stage("curate", out, work, summarize=lambda r: {"summary": r["n"]}, then=published.append)
    again = rec.run_stage("curate", out, work, then=published.append)
    assert first == again == {"n": 1} and len(calls) == 1 and published == [{"n": 1}]  # then: fresh runs only
    assert json.loads(out.read_text()) == {"n": 1}
    stage = rec.stage("curate")
    assert stage["status"] == JobStatus.COMPLETED.value and stage["result"] == {"summary": 1}
    assert lines[0].startswith("  curate: done in ") and lines[1] == "  curate: done in an earlier run"
    statuses = [e["event"]["payload"]["status"] for e in built.audit_store.entries()
                if e["event"]["type"] == "job_stage"]
    assert statuses == ["running", "completed"] and verify(built.audit_store).ok


def test_a_failure_is_recorded_and_raised_and_the_next_run_repeats_the_stage(recorder, tmp_path):
    rec, _, _ = recorder
    out = tmp_path / "train.json"

    def broken():
        raise ValueError("loss is nan\nwith a traceback below")

    with pytest.raises(ValueError):
        rec.run_stage("train", out, broken)
    stage = rec.stage("train")
    assert stage["status"] == JobStatus.FAILED.value and stage["error"] == "ValueError: with a traceback below"
    assert not out.exists()
    assert rec.run_stage("train", out, lambda: {"ok": True}) == {"ok": True}  # not reused: it had failed


def test_a_cancelled_job_starts_no_stage_and_one_cancelled_midway_is_recorded_so(recorder, tmp_path):
    rec, _, _ = recorder

    def cancel_then_fail():
        rec.update(cancel_requested=True)
        raise RuntimeError("the worker was stopped")

    with pytest.raises(RuntimeError):
        rec.run_stage("evaluate", tmp_path / "e.json", cancel_then_fail)
    stage = rec.stage("evaluate")
    assert stage["status"] == JobStatus.CANCELLED.value and "was cancelled" in stage["error"]
    with pytest.raises(JobCancelled):
        rec.run_stage("report", tmp_path / "r.json", lambda: {})
    assert rec.stage("report") is None  # never started


def test_a_completed_job_is_not_begun_again_and_a_cancelled_one_is(recorder):
    rec, _, _ = recorder
    rec.begin()
    assert rec.job()["status"] == JobStatus.RUNNING.value
    rec.update(cancel_requested=True)
    rec.end(JobStatus.CANCELLED, "job was cancelled")
    rec.begin()  # an explicit re-run of a cancelled job goes on
    assert rec.job()["status"] == JobStatus.RUNNING.value and rec.job()["cancel_requested"] is False
    rec.end(JobStatus.COMPLETED, None)
    with pytest.raises(JobFailed, match="already completed"):
        rec.begin()
