"""The automatic trigger: a job starts when a workload crosses `min_records_for_evaluation`,
and again after every `jobs.retrigger_every` more records, at most one running per workload.

Several Serve replicas see the same workload, so the decision is claimed atomically in the
job store (a `triggers` document per workload holding the count the last job started at):
only the replica whose update moved that mark starts the job.

Only records a job can learn from count: a gateway call that a served candidate answered alone
(no mirrored upstream answer, see `production_answered`) is noted in the same document
(`model_only`) and left out of the count, so a live model's own traffic never triggers its retraining.

A job that never ends would block its workload for good: one whose creator stopped before submitting
it, or whose Ray job died before its driver could record anything. So a due workload's active job,
once older than the submission grace, is reconciled with its Ray job now and then, in the background.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray_app.config import Settings
from ray_app.jobs import active_job, create_job
from ray_app.launcher import SUBMIT_GRACE_S, reconcile
from ray_app.pipeline.curation import production_answered
from ray_app.storage.base import JobStore, LogStore

logger = logging.getLogger("flywheel.trigger")


class Trigger:
    def __init__(self, settings: Settings, logs: LogStore, jobs: JobStore, *, check_every: float = 1.0):
        self.settings, self.logs, self.jobs = settings, logs, jobs
        self.check_every = check_every  # seconds between count queries per workload, per replica
        self._checked: dict[tuple[str, str], float] = {}
        self._settled: dict[str, float] = {}  # job id -> when this replica last asked Ray about it
        self._settler: ThreadPoolExecutor | None = None  # the Jobs API is not asked on the ingest thread

    def due(self, count: int, last_mark: int | None) -> bool:
        if count < self.settings.min_records_for_evaluation:
            return False
        return last_mark is None or count >= last_mark + self.settings.jobs.retrigger_every

    def check(self, workload_id: str, client_id: str) -> dict[str, Any] | None:
        """The job created for this workload now, or None."""
        jobs = self.settings.jobs
        if not jobs.auto_trigger or (jobs.auto_trigger_workloads is not None
                                     and workload_id not in jobs.auto_trigger_workloads):
            return None
        key = (workload_id, client_id)
        now = time.monotonic()
        if now - self._checked.get(key, float("-inf")) < self.check_every:
            return None
        self._checked[key] = now
        mark = self.jobs.get_doc("triggers", f"{workload_id}\x1f{client_id}") or {}
        count = self.logs.count(workload_id, client_id) - mark.get("model_only", 0)
        if not self.due(count, mark.get("count")):
            return None
        if (active := active_job(self.jobs, workload_id, client_id)) is not None:
            self._settle(active)
            return None
        claimed = {}

        def claim(doc: dict[str, Any]) -> None:
            if self.due(count, doc.get("count")):
                doc.update(count=count, at=time.time())
                claimed["ok"] = True
        self.jobs.update_doc("triggers", f"{workload_id}\x1f{client_id}", claim)
        if not claimed:
            return None  # another replica got there first
        return create_job(self.settings, self.jobs, workload_id=workload_id, client_id=client_id, trigger="auto")

    def note_model_only(self, records: list[dict[str, Any]]) -> None:
        """Stored gateway calls that only a served candidate answered: kept out of the workloads' counts."""
        model_only = Counter((r["workload_id"], r["client_id"]) for r in records if production_answered(r) is None)
        for (workload_id, client_id), n in model_only.items():
            self.jobs.update_doc("triggers", f"{workload_id}\x1f{client_id}",
                                 lambda doc, n=n: doc.update(model_only=doc.get("model_only", 0) + n))

    def _settle(self, job: dict[str, Any]) -> None:
        """Reconcile `job` with its Ray job in the background, when it is old enough to be stuck."""
        now = time.time()
        if (not self.settings.jobs.launch or now - job["created_at"] < SUBMIT_GRACE_S
                or now - self._settled.get(job["id"], float("-inf")) < SUBMIT_GRACE_S):
            return
        # only entries inside the grace still hold a job back: the map stays as small as that
        self._settled = {job_id: at for job_id, at in self._settled.items() if now - at < SUBMIT_GRACE_S}
        self._settled[job["id"]] = now
        self._settler = self._settler or ThreadPoolExecutor(1, thread_name_prefix="flywheel-settle")
        self._settler.submit(_reconcile_quietly, self.jobs, job)


def _reconcile_quietly(jobs: JobStore, job: dict[str, Any]) -> None:
    try:
        reconcile(jobs, job)
    except Exception:
        logger.warning("could not reconcile job %s with its Ray job", job["id"], exc_info=True)
