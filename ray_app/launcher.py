"""Starting a flywheel job as a Ray job: `flywheel run --job-id ID` through the Jobs API.

The job record is already in the job store (with its config overrides), so the Ray job
needs only the job id and the store locations; the driver picks up the rest. Being a
real Ray job, it shows in the dashboard with its logs, survives the Serve replica that
started it, and runs on whatever node the cluster schedules it.
"""
from __future__ import annotations

import time
from typing import Any

from ray_app.config import Settings
from ray_app.errors import StoreUnavailable


def job_env(settings: Settings) -> dict[str, str]:
    """The environment `flywheel run` needs to find the same stores and settings."""
    env = {"FLYWHEEL_DATA_DIR": str(settings.data_dir.resolve()), "HF_HUB_OFFLINE": "1"}
    if settings.log_store:
        env["FLYWHEEL_LOG_STORE"] = settings.log_store
    if settings.job_store:
        env["FLYWHEEL_JOB_STORE"] = settings.job_store
    return env


def submit_flywheel_job(settings: Settings, job: dict[str, Any], *, address: str = "auto",
                        wait_for_agent: float = 30.0) -> str:
    """Submit `flywheel run` for a stored job; returns the Ray submission id."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    entrypoint = (f"flywheel run --job-id {job['id']} --workload-id {job['workload_id']} "
                  f"--client-id {job['client_id']}")
    deadline = time.monotonic() + wait_for_agent
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, submission_id=f"flywheel-{job['id']}",
                                     runtime_env={"env_vars": job_env(settings)},
                                     entrypoint_num_cpus=settings.jobs.entrypoint_num_cpus,
                                     entrypoint_resources=settings.jobs.entrypoint_resources or None,
                                     metadata={"flywheel_job_id": job["id"], "workload_id": job["workload_id"]})
        except RuntimeError as exc:
            # A fresh node's job agent comes up a few seconds after the dashboard.
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise StoreUnavailable(f"cannot submit Ray job for {job['id']}: {exc}", retry_after=5) from exc
            time.sleep(1.0)
