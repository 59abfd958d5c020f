"""Starting a flywheel job as a Ray job: `flywheel run --job-id ID` through the Jobs API.

The job record is already in the job store (with its config overrides), so the Ray job
needs only the job id and the store locations; the driver picks up the rest. Being a
real Ray job, it shows in the dashboard with its logs, survives the Serve replica that
started it, and runs on whatever node the cluster schedules it.
"""
from __future__ import annotations

import hashlib
import shlex
import sys
import time
import uuid
from typing import Any

import yaml

from ray_app.config import Settings
from ray_app.errors import FlywheelError, StoreUnavailable
from ray_app.governance.audit import JOB_STAGE, AuditLog
from ray_app.schemas import JobStatus
from ray_app.storage.base import JobStore


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


def jobs_address() -> str:
    """Where the Jobs API of *this* process's Ray cluster is: its GCS address, from which the
    client finds the dashboard. "auto" would read /tmp/ray/ray_current_cluster instead, which
    names whichever cluster was started last on the machine, not necessarily ours."""
    import ray

    return ray.get_runtime_context().gcs_address if ray.is_initialized() else "auto"


def submission_id(job: dict[str, Any]) -> str:
    """The Ray submission id a job is always submitted under: anyone can find its Ray job from it."""
    return f"flywheel-{job['id']}"


def submit_flywheel_job(settings: Settings, job: dict[str, Any], *, address: str | None = None,
                        wait_for_agent: float = 30.0) -> str:
    """Submit `flywheel run` for a stored job; returns the Ray submission id."""
    from ray.job_submission import JobSubmissionClient

    address = address or jobs_address()
    # `flywheel run`, through this interpreter: the job's shell need not have the venv on PATH.
    entrypoint = " ".join(shlex.quote(a) for a in (
        sys.executable, "-m", "ray_app.cli", "run", "--job-id", job["id"],
        "--workload-id", job["workload_id"], "--client-id", job["client_id"]))
    env = job_env(settings)  # before the Jobs API is asked: a fault here is ours, not the cluster's
    deadline = time.monotonic() + wait_for_agent
    while True:
        try:
            client = JobSubmissionClient(address)  # checks the address: a ConnectionError when nothing answers
            return client.submit_job(entrypoint=entrypoint, submission_id=submission_id(job),
                                     runtime_env={"env_vars": env},
                                     entrypoint_num_cpus=settings.jobs.entrypoint_num_cpus,
                                     entrypoint_resources=settings.jobs.entrypoint_resources or None,
                                     metadata={"flywheel_job_id": job["id"], "workload_id": job["workload_id"]})
        except (OSError, RuntimeError) as exc:
            # A fresh node's job agent comes up a few seconds after the dashboard. Anything else,
            # a cluster without a dashboard included (ConnectionError), fails the job with the reason
            # rather than leaving it pending.
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise StoreUnavailable(f"cannot submit Ray job for {job['id']} through the Jobs API at {address}: "
                                       f"{exc}. Check that the cluster runs a dashboard with its agent up; with "
                                       f"RAY_ADDRESS unset Flywheel starts a Ray of its own (docs/ray.md)",
                                       retry_after=5) from exc
            time.sleep(1.0)


def launch(settings: Settings, store: JobStore, audit: AuditLog, job: dict[str, Any]) -> None:
    """Submit a stored job as a Ray job, in the background of whoever created it. Whatever stops
    the submission becomes the job's failure, with its reason and an audit entry: nobody awaits
    this call, so an error raised out of it would leave the job pending forever."""
    try:
        submission = submit_flywheel_job(settings, job)
    except Exception as exc:  # noqa: BLE001 - see above: every failure is recorded, none propagates
        reason = exc.message if isinstance(exc, FlywheelError) else f"cannot submit Ray job for {job['id']}: {exc!r}"
        _fail(store, job, reason)
        audit.record(JOB_STAGE, {"job_id": job["id"], "stage": "submit", "error": reason}, outcome="failure")
        return
    store.update_job(job["id"], lambda doc: doc.update(ray_submission_id=submission))


# Submission waits up to 30 s for a fresh node's job agent. Well past that, a pending job with no
# Ray job is one whose creator stopped (a replica restarted) between storing it and submitting it.
SUBMIT_GRACE_S = 120.0


def reconcile(store: JobStore, job: dict[str, Any], *, address: str | None = None) -> dict[str, Any]:
    """A job whose Ray job ended without finishing it (a crash before the driver could say so)
    is marked failed with the Ray job's own status and message, and a job the app created but
    never got submitted is marked failed as such; anything else is returned as is."""
    recorded = job.get("ray_submission_id")
    if JobStatus(job["status"]).finished or (not recorded and job.get("trigger") == "cli"):
        return job  # `flywheel run` without --job-id drives its own job: no Ray job under our id
    from ray.job_submission import JobStatus as RayStatus
    from ray.job_submission import JobSubmissionClient

    submission = recorded or submission_id(job)
    try:
        info = JobSubmissionClient(address or jobs_address()).get_job_info(submission)
    except RuntimeError as exc:  # the Jobs API answered: 404 when it has no such job
        age = time.time() - job["created_at"]
        if recorded or "404" not in str(exc) or job["status"] != JobStatus.PENDING or age < SUBMIT_GRACE_S:
            return job
        return _fail(store, job, f"never submitted: no Ray job {submission} {age:.0f} s after the job was created "
                                 "(whoever created it stopped before submitting it); create the job again")
    except Exception:  # noqa: BLE001 - no dashboard reachable: nothing to reconcile against
        return job
    if not recorded:  # submitted, but its creator stopped before recording it
        job = store.update_job(job["id"], lambda doc: doc.update(ray_submission_id=submission))
    if info.status not in (RayStatus.FAILED, RayStatus.STOPPED, RayStatus.SUCCEEDED):
        return job
    return _fail(store, job, f"Ray job {submission} ended {info.status.value}: {(info.message or '').strip()[:300]}")


def _fail(store: JobStore, job: dict[str, Any], reason: str) -> dict[str, Any]:
    def mark(doc: dict[str, Any]) -> None:
        if not JobStatus(doc["status"]).finished:  # the driver may have finished it meanwhile
            doc.update(status=JobStatus.FAILED.value, error=reason, finished_at=time.time())
    return store.update_job(job["id"], mark)
