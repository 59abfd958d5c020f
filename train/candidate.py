"""One candidate model's part of a job: base eval, ICL eval, LoRA fine-tune, customized eval.

`run_candidate` is a Ray task that holds no CPU itself: it only orchestrates. The work
runs in tasks that do hold CPUs (the evaluations) and in Ray Train workers (the
fine-tune), so the scheduler queues candidates when the cluster is full instead of
dead-locking two orchestrators on each other's CPUs. Every step is a stage in the job
record, and its output is a file under the job's dir: a re-run skips finished steps.
A failing candidate returns {"status": "failed", "error": reason}; it never raises, so
the other candidates keep going.

Governance (train/gates.py): every evaluation's `compliance_rate` is the Validator's verdict
on the generated text, and the `model_fine_tuning` policy approves each training before it
starts (including the privacy budget, composed over the workload's earlier DP runs); a denial
fails this candidate's `train` stage with the policy's reasons (its base and ICL evaluations
stand). Approvals, denials and finished trainings go to the audit trail; every finished DP
training is appended to the workload's privacy ledger (ray_app/privacy.py).
"""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import ray

from ray_app import governance
from ray_app.config import Settings
from ray_app.errors import JobCancelled, PolicyDenied
from ray_app.governance.audit import TRAINING, AuditLog
from ray_app.privacy import record_run
from ray_app.schemas import JobStatus
from ray_app.storage import open_job_store
from train import gates
from train.jobstate import CancelProbe, JobRecorder, one_line_reason, write_json

EVAL_TYPES = ("base", "icl", "customized")
# A candidate's training record (the report's `training` block): the run's metrics under these names.
TRAINING_KEYS = ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "seconds", "accountant", "workers",
                 "device", "clipping", "loss", "first_loss", "val_loss", "step_seconds", "passes_per_step",
                 "peak_memory_mb", "resumed_from", "public_examples", "public_steps", "matmul_dtype",
                 "trainable_parameters")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-80:]


def _evaluate_task(settings: Settings, job_id: str, model_spec: str, eval_type: str,
                   split_dir: str, adapter: str | None, cpus: int) -> dict[str, Any]:
    """Load the model (with its adapter for `customized`) and score it on the eval split."""
    import torch

    from evals.evaluate import answer_budget, evaluate, prompts_for
    from evals.generation import PROBE_PROMPTS, cost_probe
    from evals.models import load_model, parameter_count
    from evals.precision import for_generation, resolve

    torch.set_num_threads(cpus)
    probe = CancelProbe.for_job(settings, job_id)
    model, tokenizer = load_model(model_spec, settings.data_dir)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()  # merged: no adapter cost per token
        model.eval()
    parameters = parameter_count(model)  # before for_generation: its bf16 output layer unties a tied one
    matmul_dtype = resolve(settings.evaluation.matmul_dtype)
    model = for_generation(model, matmul_dtype)
    splits = Path(split_dir)
    eval_set = json.loads((splits / "eval.json").read_text())
    train_set = json.loads((splits / "train.json").read_text())
    icl = None
    if eval_type == "icl":
        by_id = {e["id"]: e for e in train_set}
        icl = [[by_id[i] for i in ids] for ids in json.loads((splits / "icl.json").read_text())["per_query"]]
    def run(constrained: bool) -> dict[str, Any]:
        return evaluate(model, tokenizer, eval_set, icl=icl, batch_size=settings.evaluation.batch_size,
                        max_new_tokens=answer_budget(tokenizer, train_set), constrained=constrained,
                        max_prompt_tokens=settings.training.max_seq_len * 2,
                        compliance_fn=gates.output_check(settings), should_stop=probe.check)

    result = run(settings.evaluation.constrained)
    if result["constrained"] and settings.evaluation.compare_free:  # the grammar's effect, on the same examples
        free = run(False)
        result["free"] = {k: free[k] for k in ("scores", "generation", "samples", "per_example", "per_example_args")}
    first = slice(PROBE_PROMPTS)  # the probe decodes only the first prompts: render just those
    result["probe"] = cost_probe(model, tokenizer, prompts_for(tokenizer, eval_set[first], icl and icl[first]),
                                 batch_size=settings.evaluation.batch_size,
                                 max_prompt_tokens=settings.training.max_seq_len * 2)
    result["parameters"] = parameters
    result["matmul_dtype"] = matmul_dtype
    result["cpus"] = cpus
    return result


def _train(settings: Settings, job: dict[str, Any], model_spec: str, split_dir: Path, out_dir: Path,
           cpus: int, audit: AuditLog) -> dict[str, Any]:
    from train.dp import refuse_hopeless
    from train.lora import train_lora
    from train.run_config import TrainRun

    job_id = job["id"]
    training = settings.training
    records = json.loads((split_dir / "train.json").read_text())
    hopeless = functools.partial(refuse_hopeless, training.privacy, batch_size=training.batch_size,
                                 epochs=training.epochs, max_steps=training.max_steps)
    if training.privacy.enabled:  # an epsilon the data cannot carry is refused before any policy or work
        hopeless(num_examples=len(records))
    records, budget = gates.within_budget(settings, workload_id=job["workload_id"], client_id=job["client_id"],
                                          records=records)
    decision = gates.approve_fine_tuning(settings, audit, job_id=job_id, workload_id=job["workload_id"],
                                         client_id=job["client_id"], model=model_spec, budget=budget)
    if not decision.allow:  # nothing is trained: the constitution's limits come first
        raise PolicyDenied(f"fine-tuning {gates.denial_reason(decision)}{gates.budget_note(budget)}")
    workers = training.num_workers
    run = TrainRun.for_split(settings, model=model_spec, split_dir=split_dir, job_id=job_id,
                             seed=settings.data_split.random_seed or 0, cpus_per_worker=max(1, cpus // workers))
    if budget is not None and budget.get("limited_to_fresh"):  # over budget: only records no earlier run used
        hopeless(num_examples=len(records))
        write_json(out_dir / "train_fresh.json", records)
        run = run.model_copy(update={"train_path": out_dir / "train_fresh.json"})
    result = train_lora(run, num_workers=workers, use_gpu=training.use_gpu, storage_path=out_dir / "ray_train",
                        name=f"lora-{slug(model_spec)}", max_failures=training.max_failures)
    adapter = out_dir / "adapter"
    shutil.rmtree(adapter, ignore_errors=True)
    shutil.copytree(result["checkpoint"], adapter, ignore=shutil.ignore_patterns("state.pt"))
    metrics = result["metrics"]
    trained = {"adapter": str(adapter), "steps": metrics["step"], "seconds": round(metrics["seconds"], 1),
               "loss": metrics["loss"], "first_loss": metrics["first_loss"], "val_loss": metrics["val_loss"]}
    trained.update({k: metrics[k] for k in TRAINING_KEYS if k not in trained})
    if trained["noise_multiplier"] is not None:  # DP: the run goes on the workload's privacy ledger
        record_run(open_job_store(settings), workload_id=job["workload_id"], client_id=job["client_id"],
                   job_id=job_id, model=model_spec, noise_multiplier=trained["noise_multiplier"],
                   sample_rate=trained["sample_rate"], steps=trained["steps"], delta=trained["delta"],
                   epsilon=trained["epsilon"], record_ids=[r["id"] for r in records])
    trained["privacy_budget"] = budget
    audit.record(TRAINING, {"job_id": job_id, "workload_id": job["workload_id"], "client_id": job["client_id"],
                            "model": model_spec, **{k: trained[k] for k in ("epsilon", "delta", "steps", "seconds",
                                                                            "noise_multiplier")}})
    return trained


@ray.remote(num_cpus=0, max_retries=0)
def run_candidate(settings: Settings, job_id: str, model_spec: str, job_dir: str,
                  cpus: int) -> dict[str, Any]:
    """All steps of one candidate; returns {"model", "status", "error"?, "evaluations", "training"}."""
    audit = governance.from_settings(settings).audit
    recorder = JobRecorder(open_job_store(settings), job_id, audit)
    out_dir = Path(job_dir) / "candidates" / slug(model_spec)
    split_dir = Path(job_dir) / "splits"
    outcome: dict[str, Any] = {"model": model_spec, "status": JobStatus.COMPLETED.value, "evaluations": {},
                               "training": None}
    evaluate = ray.remote(num_cpus=cpus, max_retries=0)(_evaluate_task)
    steps = [("evaluate_base", "base"), ("evaluate_icl", "icl"), ("train", None), ("evaluate_customized",
                                                                                     "customized")]
    def work(eval_type: str | None) -> dict[str, Any]:
        if eval_type is None:
            return _train(settings, recorder.job(), model_spec, split_dir, out_dir, cpus, audit)
        adapter = outcome["training"]["adapter"] if eval_type == "customized" else None
        return ray.get(evaluate.remote(settings, job_id, model_spec, eval_type, str(split_dir), adapter, cpus))

    for step, eval_type in steps:
        try:
            result = recorder.run_stage(
                f"{model_spec}:{step}", out_dir / f"{step}.json", lambda e=eval_type: work(e),
                summarize=lambda r: r.get("scores") or {k: v for k, v in r.items() if k != "adapter"},
                then=lambda r, e=eval_type: _publish(recorder, model_spec, e, r))
        except Exception as exc:  # noqa: BLE001 - one candidate's failure must not stop the others
            cancelled = isinstance(exc, JobCancelled) or bool(recorder.job().get("cancel_requested"))
            reason = f"job {job_id} was cancelled" if cancelled else one_line_reason(exc)
            status = JobStatus.CANCELLED if cancelled else JobStatus.FAILED
            return {**outcome, "status": status.value, "error": f"{step}: {reason}"}
        if eval_type is None:
            outcome["training"] = result
        else:
            outcome["evaluations"][eval_type] = result
    return outcome


def _publish(recorder: JobRecorder, model_spec: str, eval_type: str | None, result: dict[str, Any]) -> None:
    """The job's `evaluations` / `trainings` lists, for GET /v1/jobs/{id} while the job runs."""
    def mutate(job: dict[str, Any]) -> None:
        if eval_type is None:
            job["trainings"].append({"model": model_spec, **result})
        else:
            job["evaluations"].append({"model": model_spec, "eval_type": eval_type, "scores": result["scores"],
                                       "generation": result["generation"]})
    recorder.store.update_job(recorder.job_id, mutate)
