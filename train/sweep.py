"""The sweep stage: a Ray Tune grid of LoRA fine-tunes, stopped early by ASHA, scored on the eval split.

    run_sweep(settings, *, job, split_dir, out_dir, audit) -> {"scheduler", "trials", ...}

One Tune trial is one Ray Train run (the docs' Train-V2-in-Tune pattern): the trial function holds
no CPU itself and starts a TorchTrainer whose single worker asks for `sweep.trial_resources`, so
Ray's scheduler, not this code, decides how many trials fit on the cluster. The training loop
(train/lora.py) reports the answer-token loss on the val split after each epoch; `EpochReports`
forwards exactly those reports to Tune (one Tune iteration per epoch), and ASHA compares trials on
that `val_loss` at its rungs, one Tuner per model (losses under different tokenizers do not
compare). Trials that run all epochs are then scored on the eval split with
their adapter merged (train/candidate.py `_evaluate_task`, the same scoring the candidates get).

Governance is the candidates': every trial configuration goes through the `model_fine_tuning`
policy first (a denied one is recorded, not run: DP off is denied), and every trial that trained
with DP is on the workload's privacy ledger with the steps it actually took, early-stopped or not.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import ray

from ray_app.config import Settings
from ray_app.errors import JobFailed
from ray_app.governance.audit import TRAINING, AuditLog
from ray_app.local_ray import connect
from ray_app.privacy import record_run
from ray_app.schemas import JobStatus
from ray_app.storage import open_job_store
from train import gates
from train.candidate import slug
from train.jobstate import one_line_reason
from train.run_config import TrainRun

PRIVACY_KEYS = ("epsilon", "delta", "noise_multiplier", "sample_rate")
# A Tune trial must ask for something, and a CPU share would leave the Train worker a CPU short on
# a small node; a few MB of memory asks for nothing another trial needs.
DRIVER_RESOURCES = {"memory": 8 * 1024 * 1024}


def trial_points(settings: Settings) -> list[dict[str, Any]]:
    """The grid, one dict per trial; `target_epsilon` is None where DP is off (no noise to vary)."""
    sweep = settings.sweep
    models = sweep.models or [c.model for c in settings.candidates]
    points, seen = [], set()
    for model, r, lr, dp, eps, seed in itertools.product(models, sweep.lora_r, sweep.learning_rate, sweep.dp,
                                                         sweep.target_epsilon, sweep.seeds):
        point = {"model": model, "lora_r": r, "learning_rate": lr, "dp": dp, "target_epsilon": eps if dp else None,
                 "seed": seed}
        key = tuple(point.values())
        if key not in seen:
            seen.add(key)
            points.append({"trial": f"t{len(points):02d}", **point})
    return points


def trial_settings(settings: Settings, point: dict[str, Any]) -> Settings:
    """The job's settings with one trial's choices (alpha stays at 2 x r, the default's ratio)."""
    privacy = {"enabled": point["dp"]}
    if point["dp"]:
        privacy["target_epsilon"] = point["target_epsilon"]
    # max_steps off: ASHA's rungs count whole epochs, and a trial is scored once it ran all of them.
    return settings.with_overrides({"training": {
        "epochs": settings.sweep.max_epochs, "max_steps": None, "learning_rate": point["learning_rate"],
        "lora": {"r": point["lora_r"], "alpha": 2 * point["lora_r"]}, "privacy": privacy}})


def _train_run(settings: Settings, point: dict[str, Any], job_id: str, split_dir: Path,
               placement_file: Path) -> TrainRun:
    """The LoRA run of one trial: the job's settings with this trial's choices."""
    run = TrainRun.for_split(trial_settings(settings, point), model=point["model"], split_dir=split_dir,
                             job_id=job_id, seed=point["seed"],
                             cpus_per_worker=max(1, int(settings.sweep.trial_resources.cpu)))
    return run.model_copy(update={"placement_file": placement_file})


def _epoch_reports():
    """TuneReportCallback, keeping only the end-of-epoch reports (`epoch_end`, with a fresh `val_loss`).

    The loop also reports every `checkpoint_every` steps; Tune insists that every result it gets
    carries the scheduler's metric, and ASHA's clock must count epochs, not reports.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReports(TuneReportCallback):
        def __init__(self):
            super().__init__()
            self.epochs_done = 0

        def after_report(self, run_context, metrics, checkpoint):
            first = metrics[0]
            if not first.get("epoch_end") or first.get("val_loss") is None or first["epoch"] + 1 <= self.epochs_done:
                return
            self.epochs_done = first["epoch"] + 1
            super().after_report(run_context, [{**first, "epochs_done": self.epochs_done}], checkpoint)

    return EpochReports()


def _worker(config: dict[str, Any]) -> None:
    """The LoRA loop, after leaving the worker group's placement group id where `_ReleaseGroups` finds it."""
    from ray.util import get_current_placement_group

    from train.lora import fit_in_worker

    run, group = TrainRun.model_validate(config), get_current_placement_group()
    if group is not None and run.placement_file is not None:
        run.placement_file.write_text(group.id.hex())
    fit_in_worker(run)


def _release_groups(storage: Path):
    """A Tune callback that frees each finished trial's Train placement group.

    A trial ASHA stops is killed with its Train controller, which never removes its worker group's
    placement group. Ray Train's fallback (a PlacementGroupCleaner actor) asks the state API, which
    resolves the cluster as 'auto' and fails where several Ray instances share a host, so the CPUs
    stayed reserved and later trials timed out waiting for them. Removing a group the controller
    already removed is harmless.
    """
    from ray import tune
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    class ReleaseGroups(tune.Callback):
        def _release(self, trial) -> None:
            path = storage / f"{trial.trial_id}.group"
            if path.exists():
                try:
                    remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(path.read_text()))))
                except Exception:  # noqa: BLE001 - already gone
                    pass

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._release(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._release(trial)

    return ReleaseGroups()


def _trial(config: dict[str, Any], *, shared: dict[str, Any]) -> None:
    """One Tune trial: one Ray Train run of the LoRA loop with this trial's choices."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    point, resources = config["point"], shared["resources"]
    trial_id = ray.tune.get_context().get_trial_id()
    settings: Settings = shared["settings"]
    per_worker = {"CPU": resources["cpu"], **({"GPU": resources["gpu"]} if resources["gpu"] else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config=_train_run(settings, point, shared["job_id"], Path(shared["split_dir"]),
                                     Path(shared["train_storage"]) / f"{trial_id}.group").loop_config(),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=resources["gpu"] > 0, resources_per_worker=per_worker),
        run_config=RunConfig(name=f"{point['trial']}-{trial_id}",
                             storage_path=shared["train_storage"], callbacks=[_epoch_reports()],
                             failure_config=FailureConfig(max_failures=0)))
    trainer.fit()


def _approve(settings: Settings, audit: AuditLog, job: dict[str, Any], point: dict[str, Any],
             record_ids: list[str]) -> str | None:
    """None when the policy allows this trial, else the denial in words (audited either way)."""
    trial = trial_settings(settings, point)
    budget = gates.privacy_budget(trial, workload_id=job["workload_id"], client_id=job["client_id"],
                                  record_ids=record_ids)
    decision = gates.approve_fine_tuning(trial, audit, job_id=job["id"], workload_id=job["workload_id"],
                                         client_id=job["client_id"], model=point["model"], budget=budget)
    return None if decision.allow else f"fine-tuning {gates.denial_reason(decision)}{gates.budget_note(budget)}"


def _tune(settings: Settings, points: list[dict[str, Any]], shared: dict[str, Any], storage: Path,
          name: str) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sweep = settings.sweep
    if sweep.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epochs_done", max_t=sweep.max_epochs, grace_period=sweep.grace_period,
                                  reduction_factor=sweep.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    # The trial function only waits on its Train run (DRIVER_RESOURCES); its Train worker holds the trial's.
    # As many trials as the cluster's CPUs hold workers at once: more would only queue inside Train.
    cpus = ray.cluster_resources().get("CPU", 1)
    concurrent = max(1, int(cpus // sweep.trial_resources.cpu))
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, shared=shared), DRIVER_RESOURCES),
        param_space={"point": tune.grid_search(points)},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler,
                                    max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0,
                                  callbacks=[_release_groups(Path(shared["train_storage"]))],
                                  failure_config=tune.FailureConfig(max_failures=0)))
    return tuner.fit()


def _trial_record(result: Any, max_epochs: int) -> dict[str, Any]:
    point = dict(result.config["point"])
    metrics = result.metrics or {}
    history = result.metrics_dataframe
    losses = ([round(float(v), 4) for v in history["val_loss"].dropna()]
              if history is not None and "val_loss" in history else [])
    epochs = int(metrics.get("epochs_done") or 0)
    if result.error is not None:
        status, error = JobStatus.FAILED.value, one_line_reason(result.error)
    elif epochs >= max_epochs:
        status, error = JobStatus.COMPLETED.value, None
    elif epochs > 0:
        status, error = "stopped_early", None
    else:
        status, error = JobStatus.FAILED.value, "training reported no val_loss (no epoch finished)"
    training = {"steps": metrics.get("step"), "seconds": metrics.get("seconds"), "loss": metrics.get("loss"),
                **{k: metrics.get(k) for k in PRIVACY_KEYS}}
    return {**point, "status": status, "error": error, "epochs_done": epochs, "val_losses": losses,
            "val_loss": losses[-1] if losses else None,
            "trial_seconds": round(float(metrics.get("time_total_s") or 0.0), 1),
            "training": training, "checkpoint": metrics.get("checkpoint_path"), "scores": None, "generation": None}


def _ledger(settings: Settings, audit: AuditLog, job: dict[str, Any], trial: dict[str, Any],
            record_ids: list[str]) -> None:
    """A trial that took steps used the data: the audit trail and, with DP, the privacy ledger see it."""
    training = trial["training"]
    if not training["steps"]:
        return
    if training["noise_multiplier"] is not None:
        record_run(open_job_store(settings), workload_id=job["workload_id"], client_id=job["client_id"],
                   job_id=job["id"], model=trial["model"], noise_multiplier=training["noise_multiplier"],
                   sample_rate=training["sample_rate"], steps=training["steps"], delta=training["delta"],
                   epsilon=training["epsilon"], record_ids=record_ids)
    audit.record(TRAINING, {"job_id": job["id"], "workload_id": job["workload_id"], "client_id": job["client_id"],
                            "model": trial["model"], "sweep_trial": trial["trial"], "status": trial["status"],
                            **{k: training[k] for k in ("epsilon", "delta", "steps", "seconds", "noise_multiplier")}})


def _score(settings: Settings, job_id: str, split_dir: Path, trials: list[dict[str, Any]]) -> None:
    """Eval-split accuracy of each finished trial's merged adapter, in parallel Ray tasks."""
    from train.candidate import _evaluate_task

    cpus = max(1, int(settings.sweep.trial_resources.cpu))
    evaluate = ray.remote(num_cpus=cpus, max_retries=0)(_evaluate_task)
    refs = {evaluate.remote(settings, job_id, t["model"], "customized", str(split_dir), t["checkpoint"], cpus): t
            for t in trials}
    for ref, trial in refs.items():
        try:
            result = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - one trial's scoring failing leaves the others
            trial.update(status=JobStatus.FAILED.value, error=f"evaluate: {one_line_reason(exc)}")
            continue
        trial["scores"], trial["generation"] = result["scores"], result["generation"]


def run_sweep(settings: Settings, *, job: dict[str, Any], split_dir: Path, out_dir: Path,
              audit: AuditLog) -> dict[str, Any]:
    """Every trial with its status, val losses, seconds, privacy spent and (if it finished) eval scores.

    Raises JobFailed, naming each trial's reason, when no trial finished and scored.
    """
    sweep = settings.sweep
    points = trial_points(settings)
    record_ids = [e["id"] for e in json.loads((split_dir / "train.json").read_text())]
    denied = {p["trial"]: why for p in points if (why := _approve(settings, audit, job, p, record_ids))}
    allowed = [p for p in points if p["trial"] not in denied]
    trials = [{**p, "status": "denied", "error": denied[p["trial"]], "epochs_done": 0, "val_losses": [],
               "val_loss": None, "trial_seconds": 0.0, "training": None, "checkpoint": None, "scores": None,
               "generation": None} for p in points if p["trial"] in denied]
    if allowed:
        connect(dashboard=False, log_to_driver=False)
        shared = {"settings": settings, "job_id": job["id"], "split_dir": str(split_dir),
                  "train_storage": str(out_dir / "train"), "resources": sweep.trial_resources.model_dump()}
        (out_dir / "train").mkdir(parents=True, exist_ok=True)  # the workers leave their group ids here
        ran = []
        # One Tuner per model: a loss per token under one tokenizer says nothing about another's
        # (Gemma's 262k-token vocabulary against SmolLM2's 49k), so ASHA only ranks a model's own trials.
        for model in dict.fromkeys(p["model"] for p in allowed):
            grid = _tune(settings, [p for p in allowed if p["model"] == model], shared, out_dir,
                         f"tune-{slug(model)}")
            ran += [_trial_record(grid[i], sweep.max_epochs) for i in range(len(grid))]
        for trial in ran:
            _ledger(settings, audit, job, trial, record_ids)
        _score(settings, job["id"], split_dir, [t for t in ran if t["status"] == JobStatus.COMPLETED])
        trials += ran
    trials.sort(key=lambda t: t["trial"])
    if not any(t["scores"] for t in trials):
        reasons = "; ".join(f"{t['trial']} {t['model']}: {t['status']} ({t['error']})" for t in trials)
        raise JobFailed(f"every sweep trial failed: {reasons}"[:1000])
    return {"scheduler": sweep.scheduler, "metric": "val_loss", "max_epochs": sweep.max_epochs,
            "grace_period": sweep.grace_period, "reduction_factor": sweep.reduction_factor,
            "trial_resources": sweep.trial_resources.model_dump(), "trials": trials,
            "stopped_early": sum(t["status"] == "stopped_early" for t in trials),
            "trial_seconds_total": round(sum(t["trial_seconds"] for t in trials), 1),
            "trial_epochs_total": sum(t["epochs_done"] for t in trials)}
