"""The job's record in the JobStore: stages with timings and errors, and cooperative cancellation.

Every write goes through `JobStore.update_job`, which is atomic, so the driver and its
Ray workers (several processes) never lose each other's updates. A stage is looked up by
name; re-running a job finds the stages already `completed` and skips them. `JobRecorder.run_stage`
is the one way a stage runs, for the job's own stages and each candidate's alike.
With an AuditLog, every stage start and end is also a `job_stage` audit entry.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray_app.config import Settings
from ray_app.errors import FlywheelError, JobCancelled, JobFailed
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


def write_json(path: Path, data: Any) -> None:
    """Write-then-rename: a crash never leaves half a stage output that a re-run would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


class JobRecorder:
    """Stage bookkeeping for one job. `say`: where progress lines go (the job's console and log)."""

    def __init__(self, store: JobStore, job_id: str, audit: AuditLog | None = None,
                 say: Callable[[str], Any] | None = None):
        self.store, self.job_id, self.audit = store, job_id, audit
        self.say = say or (lambda line: None)

    def run_stage(self, name: str, output: Path, work: Callable[[], Any], *,
                  summarize: Callable[[Any], dict[str, Any]] | None = None,
                  then: Callable[[Any], Any] | None = None) -> Any:
        """One stage start to end, returning its result: its output from an earlier run when the stage
        completed then; else, unless the job was cancelled, start it, run `work`, write its output
        (before the stage says completed, so a crash in between only repeats it), finish it with
        `summarize(result)` (default: the result) as the stage's result, then call `then(result)`.
        A failure is recorded, as cancelled when the job was, and raised."""
        done = self.stage(name)
        if output.exists() and done and done["status"] == JobStatus.COMPLETED.value:
            self.say(f"  {name}: done in an earlier run")
            return json.loads(output.read_text())
        if self.job().get("cancel_requested"):
            raise JobCancelled(f"job {self.job_id} was cancelled")
        self.start(name)
        started = time.time()
        try:
            result = work()
        except Exception as exc:
            cancelled = isinstance(exc, JobCancelled) or bool(self.job().get("cancel_requested"))
            self.fail(name, f"job {self.job_id} was cancelled" if cancelled else one_line_reason(exc),
                      cancelled=cancelled)
            raise
        write_json(output, result)
        self.finish(name, summarize(result) if summarize else result)
        if then is not None:
            then(result)
        self.say(f"  {name}: done in {time.time() - started:.1f}s")
        return result

    def begin(self) -> None:
        """The job runs (again): a completed job is refused; an explicit re-run of a cancelled one goes on."""
        def mutate(job: dict[str, Any]) -> None:
            if job["status"] == JobStatus.COMPLETED.value:
                raise JobFailed(f"job {job['id']} already completed")
            if job["status"] == JobStatus.CANCELLED.value:
                job["cancel_requested"] = False
            job.update(status=JobStatus.RUNNING.value, started_at=job.get("started_at") or time.time(), error=None,
                       finished_at=None)
        self.store.update_job(self.job_id, mutate)
        self.audit_stage("job", JobStatus.RUNNING.value)

    def end(self, status: JobStatus, error: str | None, **fields: Any) -> None:
        self.update(status=status.value, error=error, finished_at=time.time(), **fields)
        self.audit_stage("job", status.value, **({"error": error} if error else {}))

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
    def for_job(cls, settings: Settings, job_id: str | None) -> CancelProbe:
        """Inside a Ray worker: the job store the settings name; no job, nothing to cancel."""
        return cls(open_job_store(settings), job_id) if job_id else cls(None, None)

    def check(self) -> None:
        if self.store is None or time.monotonic() - self._last < self.every:
            return
        self._last = time.monotonic()
        if self.store.get_job(self.job_id).get("cancel_requested"):
            raise JobCancelled(f"job {self.job_id} was cancelled")
