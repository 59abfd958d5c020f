"""Job lifecycle shared by the HTTP API, the CLI and the automatic trigger.

A job is created `pending`; the runner (a Ray job driving the pipeline) moves it to
`running` and then to a finished state. Cancellation is cooperative: we set
`cancel_requested` and the runner checks it inside every long loop; a job that has not
started yet is cancelled at once.
"""
from __future__ import annotations

from typing import Any

from ray_app.config import Settings
from ray_app.errors import Conflict
from ray_app.schemas import Job, JobStatus
from ray_app.storage.base import JobDict, JobStore


def create_job(settings: Settings, store: JobStore, *, workload_id: str, client_id: str,
               config: dict[str, Any] | None = None, trigger: str = "api") -> JobDict:
    """Validate the job's config overrides against the settings, then store it as pending."""
    settings.with_overrides(config)  # raises ConfigError naming the bad key or value
    job = Job(workload_id=workload_id, client_id=client_id, config=config or {}, trigger=trigger,
              constitutional_hash=settings.governance.constitutional_hash)
    return store.create_job(job.model_dump(mode="json"))


def request_cancel(store: JobStore, job_id: str) -> JobDict:
    def mutate(job: JobDict) -> None:
        status = JobStatus(job["status"])
        if status.finished:
            raise Conflict(f"job {job_id} is already {status.value}", field="id")
        job["cancel_requested"] = True
        if status is JobStatus.PENDING:  # nothing runs it yet: cancelled now
            job["status"] = JobStatus.CANCELLED.value
    return store.update_job(job_id, mutate)


def delete_job(store: JobStore, job_id: str) -> JobDict:
    """Delete a job that is not running; a running one must be cancelled first."""
    job = store.get_job(job_id)
    if job["status"] == JobStatus.RUNNING.value:
        raise Conflict(f"job {job_id} is running: cancel it first", field="id")
    store.delete_job(job_id)
    return job


def active_job(store: JobStore, workload_id: str, client_id: str) -> JobDict | None:
    """The pending or running job of a workload, if any (at most one runs per workload)."""
    for status in (JobStatus.RUNNING, JobStatus.PENDING):
        jobs = store.list_jobs(workload_id=workload_id, client_id=client_id, status=status.value, limit=1)
        if jobs:
            return jobs[0]
    return None


def summary(job: JobDict) -> dict[str, Any]:
    return {"id": job["id"], "status": job["status"]}
