"""The flywheel job: curate a workload's logs, evaluate and fine-tune candidates, report, recommend.

Entry point (what `flywheel run` and the job API call, through the `flywheel.plugins`
entry point `run`):

    run_job(settings, *, workload_id, client_id, job_id=None, out_dir=None) -> dict

- `job_id=None` creates a job in the JobStore; a given id runs that (pending, failed or
  cancelled) job, with the job's own `config` merged over `settings`, resuming after its
  last finished stage (stage outputs live under `<data_dir>/jobs/<job_id>/`).
- Returns the report (also written as report.json, report.md and accuracy.png into
  `out_dir`, default `<data_dir>/reports/<job_id>/`).
- Raises NotFound (unknown workload), JobFailed (with the one-line reason also stored on
  the job) or JobCancelled; the job's status says the same.
Stages: curate -> select_icl -> per candidate (in parallel Ray tasks) evaluate_base,
evaluate_icl, train, evaluate_customized -> sweep (with `sweep.enabled`: train/sweep.py, a Ray Tune
grid stopped early by ASHA; its trials are stored in the stage's result) -> report.

Governance (train/gates.py) makes real decisions along the way: curation keeps only the
records whose production answer the Validator allows, the fine-tuning policy approves each
training, and the promotion policy decides `recommendation.promoted`. Every stage start and
end, training, policy decision and promotion is an entry on the audit hash chain.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray
from rich.console import Console

from ray_app import governance
from ray_app.config import Settings
from ray_app.errors import FlywheelError, JobCancelled, JobFailed
from ray_app.local_ray import connect
from ray_app.pipeline.curation import curate, eval_kind, export_records, require_enough, workload_type_of
from ray_app.pipeline.icl import SemanticSelector, select_uniform
from ray_app.pipeline.split import split_examples
from ray_app.schemas import Job, JobStatus
from ray_app.storage import open_job_store, open_log_store
from train import gates
from train.candidate import run_candidate
from train.jobstate import JobRecorder, one_line_reason, write_json
from train.register import register_models
from train.report import build_report, write_report
from train.sweep import run_sweep

console = Console(stderr=True)


def run_job(settings: Settings, *, workload_id: str, client_id: str, job_id: str | None = None,
            out_dir: str | Path | None = None) -> dict[str, Any]:
    settings = settings.model_copy(update={"data_dir": Path(settings.data_dir).resolve()})  # Ray workers' cwd differs
    store = open_job_store(settings)
    if job_id is None:
        job = Job(workload_id=workload_id, client_id=client_id, trigger="cli",
                  constitutional_hash=settings.governance.constitutional_hash).model_dump(mode="json")
        job_id = store.create_job(job)["id"]
    else:
        job = store.get_job(job_id)
        if (job["workload_id"], job["client_id"]) != (workload_id, client_id):
            raise JobFailed(f"job {job_id} belongs to {job['workload_id']}/{job['client_id']}, "
                            f"not {workload_id}/{client_id}")
        settings = settings.with_overrides(job.get("config"))
    audit = governance.from_settings(settings).audit
    recorder = JobRecorder(store, job_id, audit, say=console.print)
    job_dir = settings.data_dir / "jobs" / job_id
    out = Path(out_dir) if out_dir else settings.data_dir / "reports" / job_id
    recorder.begin()
    console.print(f"[bold]flywheel job {job_id}[/] on {workload_id}/{client_id}")
    try:
        splits = recorder.run_stage("curate", job_dir / "splits" / "summary.json",
                                    lambda: _curate(settings, workload_id, client_id, job_dir / "splits"))
        recorder.run_stage("select_icl", job_dir / "splits" / "icl.json",
                           lambda: _select_icl(settings, job_dir / "splits"))
        outcomes = _run_candidates(settings, recorder, job_dir)
        sweep = None
        if settings.sweep.enabled:
            sweep = recorder.run_stage("sweep", job_dir / "sweep" / "sweep.json",
                                       lambda: run_sweep(settings, job=recorder.job(), split_dir=job_dir / "splits",
                                                         out_dir=job_dir / "sweep", audit=audit))
        report = recorder.run_stage("report", out / "report.json",
                                    lambda: write_report(gates.promote(settings, audit, build_report(
                                        settings, recorder.job(), splits, outcomes, sweep)), out),
                                    summarize=lambda r: {"recommendation": r["recommendation"]})
        recorder.run_stage("register", job_dir / "registered.json",  # into the model registry: servable
                           lambda: register_models(settings, recorder.job(), report, outcomes, job_dir / "splits"))
    except JobCancelled as exc:
        recorder.end(JobStatus.CANCELLED, exc.message)
        raise
    except FlywheelError as exc:
        recorder.end(JobStatus.FAILED, one_line_reason(exc))
        raise
    except Exception as exc:
        reason = one_line_reason(exc)
        recorder.end(JobStatus.FAILED, reason)
        raise JobFailed(reason) from exc
    recorder.end(JobStatus.COMPLETED, None, report_dir=str(out))
    console.print(f"[green]report[/] {out / 'report.json'}")
    return report


def _curate(settings: Settings, workload_id: str, client_id: str, split_dir: Path) -> dict[str, Any]:
    log_store = open_log_store(settings)
    records = export_records(log_store, workload_id, client_id, limit=settings.data_split.limit)
    workload_type = workload_type_of(records)
    examples, stats = curate(records, workload_type=workload_type, compliant=gates.record_check(settings),
                             repair=gates.record_repair(settings))
    require_enough(examples, stats, min_total=settings.data_split.min_total_records)
    splits = split_examples(examples, settings.data_split)
    for name, items in splits.items():
        write_json(split_dir / f"{name}.json", items)
    return {"workload_type": workload_type, "eval_kind": eval_kind(workload_type), "num_records": len(records),
            "curation": stats, "eval": len(splits["eval"]), "train": len(splits["train"]),
            "val": len(splits["val"])}


def _approx_tokens(example: dict[str, Any]) -> int:
    """Tokenizer-free estimate (the selection is shared by candidates with different tokenizers)."""
    from evals.prompts import target_of

    return 8 + (len(example["user_text"]) + len(target_of(example["record"], example["workload_type"]))) // 3


def _select_icl(settings: Settings, split_dir: Path) -> dict[str, Any]:
    eval_set = json.loads((split_dir / "eval.json").read_text())
    train_set = json.loads((split_dir / "train.json").read_text())
    icl = settings.icl_config
    budget = {"max_examples": icl.max_examples, "budget_tokens": icl.max_context_length, "cost": _approx_tokens}
    if icl.example_selection == "semantic_similarity":
        from evals.embeddings import embed

        per_query = SemanticSelector(train_set, embed).select(eval_set, **budget)
    else:
        shared = select_uniform(train_set, seed=settings.data_split.random_seed, **budget)
        per_query = [shared] * len(eval_set)
    distinct = {e["id"] for shots in per_query for e in shots}
    return {"selection": icl.example_selection, "per_query": [[e["id"] for e in shots] for shots in per_query],
            "icl_examples": len(distinct)}


def _run_candidates(settings: Settings, recorder: JobRecorder, job_dir: Path) -> list[dict[str, Any]]:
    """Candidates in parallel, each with an equal share of the cluster's CPUs (at least one, at most a node's)."""
    connect(dashboard=False, log_to_driver=False)  # a Ray job's driver joins its cluster
    total = int(ray.cluster_resources().get("CPU", 1))
    # A task runs on one node: asking for more CPUs than any node has free (other jobs' drivers hold
    # some) would wait forever, so the share is capped by the freest node's whole CPUs.
    from ray._private.state import available_resources_per_node

    free = [int(r.get("CPU", 0)) for r in available_resources_per_node().values()]
    biggest = max(free, default=1)
    specs = [c.model for c in settings.candidates]
    cpus = max(1, min(biggest, total // min(len(specs), total)))
    refs = {run_candidate.remote(settings, recorder.job_id, spec, str(job_dir), cpus): spec for spec in specs}
    outcomes: dict[str, dict[str, Any]] = {}
    pending = list(refs)
    with console.status(f"candidates: {', '.join(specs)}") as status:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=5.0)
            for ref in ready:
                spec = refs[ref]
                try:
                    outcomes[spec] = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the orchestrator itself died (OOM, killed worker)
                    outcomes[spec] = {"model": spec, "status": JobStatus.FAILED.value, "error": one_line_reason(exc),
                                      "evaluations": {}, "training": None}
                state = outcomes[spec]
                console.print(f"  candidate {spec}: {state['status']}" + (f" ({state['error']})"
                                                                           if state.get("error") else ""))
            running = [s["name"] for s in recorder.job()["stages"] if s["status"] == JobStatus.RUNNING.value]
            status.update(f"running: {', '.join(running) or 'starting'}")
    ordered = [outcomes[s] for s in specs]
    if any(o["status"] == JobStatus.CANCELLED for o in ordered):
        raise JobCancelled(f"job {recorder.job_id} was cancelled")
    if not any(o["evaluations"] for o in ordered):
        reasons = "; ".join(f"{o['model']}: {o.get('error')}" for o in ordered)
        raise JobFailed(f"no candidate produced an evaluation ({reasons})"[:500])
    return ordered
