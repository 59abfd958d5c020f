"""Starting a flywheel job as a Ray job: `flywheel run --job-id ID` through the Jobs API.

The job record is already in the job store (with its config overrides), so the Ray job
needs only the job id and the store locations; the driver picks up the rest. Being a
real Ray job, it shows in the dashboard with its logs, survives the Serve replica that
started it, and runs on whatever node the cluster schedules it.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

import yaml

from ray_app.config import Settings
from ray_app.errors import StoreUnavailable


def job_env(settings: Settings) -> dict[str, str]:
    """The environment `flywheel run` needs to run with the same settings as whoever submits it.

    The settings (less the admin key) go to a YAML file in the data dir, named by content, so
    the driver loads exactly them; the data dir is shared storage on a real cluster anyway.
    """
    body = yaml.safe_dump(settings.model_dump(mode="json", exclude={"admin_key"}), sort_keys=True)
    path = settings.data_dir / "run-config" / f"settings-{hashlib.sha256(body.encode()).hexdigest()[:16]}.yaml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(body)
        tmp.replace(path)  # atomic: a reader never sees half a file
    return {"FLYWHEEL_CONFIG": str(path), "FLYWHEEL_DATA_DIR": str(settings.data_dir), "HF_HUB_OFFLINE": "1"}


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
