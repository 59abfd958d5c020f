"""The automatic trigger: a job when a workload crosses the threshold, again every N more,
never two at once, and only one replica wins a race."""
from __future__ import annotations

import time

import pytest

from ray_app import trigger as trigger_module
from ray_app.config import load_settings
from ray_app.jobs import create_job, request_cancel
from ray_app.launcher import SUBMIT_GRACE_S
from ray_app.storage import open_job_store, open_log_store
from ray_app.trigger import Trigger
from tests.store_support import chat_record


@pytest.fixture
def parts(tmp_path):
    settings = load_settings(env={"FLYWHEEL_DATA_DIR": str(tmp_path)}).with_overrides(
        {"data_split": {"min_total_records": 50}, "jobs": {"retrigger_every": 100}})
    logs, jobs = open_log_store(settings), open_job_store(settings)
    return settings, logs, jobs


def _add(logs, start: int, n: int) -> None:
    logs.put_many([chat_record(i, workload_id="w", client_id="c") for i in range(start, start + n)])


def test_fires_at_the_threshold_then_every_n_more(parts):
    settings, logs, jobs = parts
    trigger = Trigger(settings, logs, jobs, check_every=0)
    _add(logs, 0, 49)
    assert trigger.check("w", "c") is None
    _add(logs, 49, 1)
    job = trigger.check("w", "c")
    assert job and job["trigger"] == "auto" and job["status"] == "pending"
    assert trigger.check("w", "c") is None  # one is pending: never two at once
    request_cancel(jobs, job["id"])
    _add(logs, 50, 99)
    assert trigger.check("w", "c") is None  # 149 < 50 + 100
    _add(logs, 149, 1)
    second = trigger.check("w", "c")
    assert second and second["id"] != job["id"]


def test_calls_a_served_model_answered_alone_do_not_count(parts):
    settings, logs, jobs = parts
    trigger = Trigger(settings, logs, jobs, check_every=0)
    _add(logs, 0, 45)
    live = [chat_record(i, workload_id="w", client_id="c") | {"served_by": "ft:m:1"} for i in range(100, 110)]
    mirrored = [chat_record(i, workload_id="w", client_id="c") | {
        "served_by": "ft:m:1", "shadow": {"served_by": "upstream", "response": chat_record(i)["response"]}}
        for i in range(200, 204)]
    logs.put_many(live + mirrored)
    trigger.note_model_only(live + mirrored)
    assert trigger.check("w", "c") is None  # 59 stored, 49 a job could learn from
    _add(logs, 45, 1)
    assert trigger.check("w", "c") is not None  # the 50th: mirrored calls count, the model's own do not


def test_two_replicas_race_and_one_wins(parts):
    settings, logs, jobs = parts
    _add(logs, 0, 60)
    a, b = Trigger(settings, logs, jobs, check_every=0), Trigger(settings, logs, jobs, check_every=0)
    results = [a.check("w", "c"), b.check("w", "c")]
    assert sum(r is not None for r in results) == 1
    assert len(jobs.list_jobs(workload_id="w")) == 1


def test_throttled_and_disabled(parts):
    settings, logs, jobs = parts
    _add(logs, 0, 60)
    off = Trigger(settings.with_overrides({"jobs": {"auto_trigger": False}}), logs, jobs, check_every=0)
    assert off.check("w", "c") is None
    others = Trigger(settings.with_overrides({"jobs": {"auto_trigger_workloads": ["x"]}}), logs, jobs,
                     check_every=0)
    assert others.check("w", "c") is None
    assert jobs.list_jobs(workload_id="w") == []
    slow = Trigger(settings, logs, jobs, check_every=3600)
    first = slow.check("w", "c")
    request_cancel(jobs, first["id"])
    _add(logs, 60, 200)
    assert slow.check("w", "c") is None  # due, but this replica counted less than an hour ago


def test_a_due_workloads_old_job_is_reconciled_at_most_once_a_grace(parts, monkeypatch):
    """A workload that is due but has an active job: once that job is older than the submission grace,
    the trigger has it reconciled (in the background), again only after another grace, and it
    remembers only the jobs it asked about within the last one."""
    settings, logs, jobs = parts
    asked = []
    clock = {"now": time.time()}

    class Clock:
        monotonic = staticmethod(time.monotonic)
        time = staticmethod(lambda: clock["now"])

    monkeypatch.setattr(trigger_module, "time", Clock)
    monkeypatch.setattr(trigger_module, "reconcile", lambda store, job: asked.append(job["id"]))
    trigger = Trigger(settings, logs, jobs, check_every=0)
    _add(logs, 0, 60)
    first = create_job(settings, jobs, workload_id="w", client_id="c", trigger="auto")
    assert trigger.check("w", "c") is None and asked == []  # too young to be stuck
    clock["now"] += SUBMIT_GRACE_S + 1
    for _ in range(3):
        assert trigger.check("w", "c") is None
    trigger._settler.shutdown(wait=True)
    assert asked == [first["id"]]  # once, however often the workload is seen
    jobs.update_job(first["id"], lambda doc: doc.update(status="cancelled"))  # it ended: the workload may start another
    second = create_job(settings, jobs, workload_id="w", client_id="c", trigger="auto")
    clock["now"] += 2 * SUBMIT_GRACE_S
    trigger._settler = None
    _add(logs, 60, 200)
    assert trigger.check("w", "c") is None
    trigger._settler.shutdown(wait=True)
    assert asked == [first["id"], second["id"]]
    assert list(trigger._settled) == [second["id"]]  # the first one's entry is gone
