"""The job's record in the JobStore: stages with timings and errors, and cooperative cancellation.

Every write goes through `JobStore.update_job`, which is atomic, so the driver and its
Ray workers (several processes) never lose each other's updates. A stage is looked up by
name; re-running a job finds the stages already `completed` and skips them.
With an AuditLog, every stage start and end is also a `job_stage` audit entry.
"""
from __future__ import annotations

import time
from typing import Any

from ray_app.config import Settings
from ray_app.errors import FlywheelError, JobCancelled
from ray_app.governance.audit import JOB_STAGE, AuditLog
from ray_app.schemas import JobStatus, Stage
from ray_app.storage import open_job_store
from ray_app.storage.base import JobStore


def one_line_reason(exc: BaseException) -> str:
    """The most specific message in an exception chain (Ray wraps worker errors twice or more)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, FlywheelError):
            return exc.message.splitlines()[0][:300]
        inner = getattr(exc, "cause", None) or exc.__cause__
        if inner is None:
            break
        exc = inner
    text = str(exc).strip().splitlines()
    lines = [line.strip() for line in text if line.strip() and not line.startswith(("Traceback", "  File"))]
    return f"{type(exc).__name__}: {lines[-1][:300]}" if lines else type(exc).__name__


def worker_died(exc: Exception) -> bool:
    """Whether a failed fit lost a worker process (retryable) rather than raised in the loop."""
    import ray.exceptions
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError

    died = (ray.exceptions.RayActorError, WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError)
    failures = getattr(exc, "worker_failures", None) or {}
    return bool(failures) and all(isinstance(e, died) for e in failures.values())


class JobRecorder:
    """Stage bookkeeping for one job."""

    def __init__(self, store: JobStore, job_id: str, audit: AuditLog | None = None):
        self.store, self.job_id, self.audit = store, job_id, audit

    def audit_stage(self, name: str, status: str, **extra: Any) -> None:
        if self.audit is not None:
            self.audit.record(JOB_STAGE, {"job_id": self.job_id, "stage": name, "status": status, **extra},
                              outcome="success" if status in (JobStatus.RUNNING, JobStatus.COMPLETED) else status)

    def job(self) -> dict[str, Any]:
        return self.store.get_job(self.job_id)

    def stage(self, name: str) -> dict[str, Any] | None:
        return next((s for s in self.job()["stages"] if s["name"] == name), None)

    def start(self, name: str) -> None:
        def mutate(job: dict[str, Any]) -> None:
            stage = _find(job, name)
            stage.update(status=JobStatus.RUNNING.value, started_at=time.time(), finished_at=None, error=None)
        self.store.update_job(self.job_id, mutate)
        self.audit_stage(name, JobStatus.RUNNING.value)

    def finish(self, name: str, result: dict[str, Any] | None = None) -> None:
        def mutate(job: dict[str, Any]) -> None:
            stage = _find(job, name)
            stage.update(status=JobStatus.COMPLETED.value, finished_at=time.time(), result=result or {})
        self.store.update_job(self.job_id, mutate)
        self.audit_stage(name, JobStatus.COMPLETED.value)

    def fail(self, name: str, reason: str, *, cancelled: bool = False) -> None:
        status = JobStatus.CANCELLED if cancelled else JobStatus.FAILED

        def mutate(job: dict[str, Any]) -> None:
            stage = _find(job, name)
            stage.update(status=status.value, finished_at=time.time(), error=reason)
        self.store.update_job(self.job_id, mutate)
        self.audit_stage(name, status.value, error=reason)

    def update(self, **fields: Any) -> dict[str, Any]:
        return self.store.update_job(self.job_id, lambda job: job.update(fields))


def _find(job: dict[str, Any], name: str) -> dict[str, Any]:
    for stage in job["stages"]:
        if stage["name"] == name:
            return stage
    stage = Stage(name=name).model_dump(mode="json")
    job["stages"].append(stage)
    return stage


class CancelProbe:
    """`check()` raises JobCancelled once the job's `cancel_requested` is set; reads at most every `every` s."""

    def __init__(self, store: JobStore | None, job_id: str | None, *, every: float = 2.0):
        self.store, self.job_id, self.every = store, job_id, every
        self._last = 0.0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CancelProbe:
        """Rebuilt inside a Ray worker from plain data: the settings (as JSON) and the job id."""
        if not config.get("job_id"):
            return cls(None, None)
        settings = Settings.model_validate(config["settings"])
        return cls(open_job_store(settings), config["job_id"])

    def check(self) -> None:
        if self.store is None or time.monotonic() - self._last < self.every:
            return
        self._last = time.monotonic()
        if self.store.get_job(self.job_id).get("cancel_requested"):
            raise JobCancelled(f"job {self.job_id} was cancelled")
