"""The sweep on the real packaged models: ASHA against the full grid, and the cost/accuracy frontier.

The same grid (SmolLM2-135M and Gemma 3 270M x LoRA rank 1 and 2 at the training recipe's learning
rate, DP-LoRA at epsilon 8 as the policy requires) runs twice on the demo's simulated
customer-service traffic (ray_app/simulator): once with ASHA stopping weak trials on their val loss
after the first epoch, once with every trial running all epochs. Each model's cost is measured
once per eval type (batched generation on the eval split, as the job does), and the frontier's points
are the job's: each model's base and in-context evaluations and every scored trial. Rows: total trial
seconds and epochs of each, best accuracy of each (and of each model), each model's best trial by val
loss under each (the metric ASHA stops on), trials stopped early, prices, frontier points.
Sized for ~25 minutes on 2 idle CPUs (22-24 in the last runs): 200 records, 4 epochs, a 20-example eval split.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tests.bench.bench_flywheel import _shared_model_cache

MODELS = ("smollm2-135m", "gemma3-270m")
RECORDS = 200


def _row(metric: str, value, unit: str, goal: str = "", note: str = "") -> dict:
    return {"benchmark": "sweep", "metric": metric, "value": value, "unit": unit, "goal": goal, "note": note}


def _settings(data_dir: Path, scheduler: str):
    from ray_app.config import Settings

    return Settings.model_validate({
        "data_dir": str(data_dir), "candidates": [{"model": m} for m in MODELS],
        "data_split": {"eval_size": 20, "random_seed": 0},
        "sweep": {"enabled": True, "lora_r": [1, 2], "learning_rate": [2e-2], "dp": [True],
                  "scheduler": scheduler, "max_epochs": 4, "grace_period": 1, "reduction_factor": 2}})


def _splits(settings, split_dir: Path) -> None:
    from ray_app.pipeline.curation import curate
    from ray_app.pipeline.split import split_examples
    from ray_app.schemas import record_id
    from ray_app.simulator import generate
    from train.jobstate import write_json

    records = [{**r, "id": record_id(r)} for r in generate("customer-service", RECORDS, seed=1)]
    examples, _ = curate(records, workload_type="tool_calling")
    for name, items in split_examples(examples, settings.data_split).items():
        write_json(split_dir / f"{name}.json", items)


def _candidates(settings, split_dir: Path) -> list[dict]:
    """Each model's base and in-context evaluations, priced from their own runs, as the job has them:
    the frontier's points besides the trials (in-context prompts carry their examples, so that price
    is the model's dearer one)."""
    import ray

    from train.candidate import _evaluate_task
    from train.flywheel_job import _select_icl
    from train.jobstate import write_json
    from train.report import _scores, prices

    write_json(split_dir / "icl.json", _select_icl(settings, split_dir))
    evaluate = ray.remote(num_cpus=1, max_retries=0)(_evaluate_task)
    kinds = ("base", "icl")
    runs = ray.get([evaluate.remote(settings, "", m, kind, str(split_dir), None, 1) for m in MODELS for kind in kinds])
    out = []
    for i, model in enumerate(MODELS):
        evals = dict(zip(kinds, runs[i * len(kinds):(i + 1) * len(kinds)], strict=True))
        out.append({"model": model, "parameters": evals["base"]["parameters"],
                    "evaluations": {kind: _scores(run) for kind, run in evals.items()}, **prices(settings, evals)})
    return out


def run() -> list[dict]:
    from ray_app import governance
    from ray_app.local_ray import connect
    from ray_app.schemas import Job
    from ray_app.storage import open_job_store
    from train import frontier
    from train.sweep import run_sweep

    rows, outcomes = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        data_dir = Path(tmp)
        _shared_model_cache(data_dir)
        connect(num_cpus=os.cpu_count(), dashboard=False, log_to_driver=False)
        base = _settings(data_dir, "asha")
        split_dir = data_dir / "splits"
        _splits(base, split_dir)
        candidates = _candidates(base, split_dir)
        for scheduler in ("asha", "fifo"):
            settings = _settings(data_dir, scheduler)
            job = open_job_store(settings).create_job(Job(workload_id="customer-service",
                                                          client_id="acme").model_dump(mode="json"))
            sweep = run_sweep(settings, job=job, split_dir=split_dir, out_dir=data_dir / scheduler,
                              audit=governance.from_settings(settings).audit)
            outcomes[scheduler] = frontier.sweep_block(sweep, candidates)
    asha, grid = outcomes["asha"], outcomes["fifo"]

    def best(block: dict) -> float | None:
        top = _most_accurate(block)
        return top and top["accuracy"]

    saved = 1 - asha["trial_seconds_total"] / grid["trial_seconds_total"]
    rows += [_row("trial_seconds_total:asha", asha["trial_seconds_total"], "s", note=f"{len(asha['trials'])} trials"),
             _row("trial_seconds_total:grid", grid["trial_seconds_total"], "s", note="every trial runs all epochs"),
             _row("asha_time_saved", round(saved, 3), "fraction", goal="> 0",
                  note="PASS" if saved > 0 else "MISS"),
             # Epochs trained: the work ASHA saves, free of the wall-clock noise of a shared machine.
             _row("trial_epochs_total:asha", asha["trial_epochs_total"], "epochs"),
             _row("trial_epochs_total:grid", grid["trial_epochs_total"], "epochs"),
             _row("trials_stopped_early:asha", asha["stopped_early"], "trials"),
             _row("trials_failed:asha", sum(t["status"] == "failed" for t in asha["trials"]), "trials"),
             _row("trials_failed:grid", sum(t["status"] == "failed" for t in grid["trials"]), "trials"),
             _row("best_trial_accuracy:asha", best(asha), "ratio"),
             _row("best_trial_accuracy:grid", best(grid), "ratio", goal="== asha's",
                  note=("PASS" if best(asha) == best(grid) else "MISS") + _where_asha_left(asha, grid))]
    for model in MODELS:  # what ASHA stops on: each model's val loss (one Tuner per tokenizer)
        mine, theirs = _best_by_loss(asha, model), _best_by_loss(grid, model)
        same = mine is not None and theirs is not None and mine["trial"] == theirs["trial"]
        rows.append(_row(f"best_trial_by_val_loss:{model}", mine and mine["val_loss"], "nats", goal="grid's best",
                         note=f"{'PASS' if same else 'MISS'}: asha {_named(mine)}, grid {_named(theirs)}"))
    for c in candidates:  # each model's measured prices and scores: what places its points on the frontier
        for kind, cost in c["cost_by_eval_type"].items():
            scores = c["evaluations"][kind] or {}
            rows.append(_row(f"cost:{c['model']}:{kind}", cost.get("usd_per_million_tokens"), "$/1M tokens",
                             note=f"{cost.get('tokens_per_second')} tok/s, p50 {cost.get('latency_ms_p50')} ms, "
                                  f"{c['parameters']} params, accuracy {scores.get('function_name_accuracy')}"))
        mine = [t for t in asha["trials"] if t["model"] == c["model"]]
        scored = [t["accuracy"] for t in mine if t["accuracy"] is not None]
        rows.append(_row(f"best_trial_accuracy:asha:{c['model']}", max(scored) if scored else None, "ratio",
                         note=f"{len(scored)} of {len(mine)} trials scored"))
    for p in asha["frontier"]:
        rows.append(_row(f"frontier:{p['model']}:{p['source']}:{p['trial'] or '-'}", p["accuracy"], "ratio",
                         note=f"${p['usd_per_million_tokens']}/1M tok, {p['tokens_per_second']} tok/s, "
                              f"p50 {p['latency_ms_p50']} ms, {p['parameters']} params, r={p['lora_r']}, "
                              f"lr={p['learning_rate']}"))
    rows.append(_row("frontier_models", len(asha["models_on_frontier"]), "models", goal=">= 2",
                     note=", ".join(asha["models_on_frontier"])))
    return rows


def _most_accurate(block: dict) -> dict | None:
    scored = [t for t in block["trials"] if t["accuracy"] is not None]
    return max(scored, key=lambda t: t["accuracy"]) if scored else None


def _best_by_loss(block: dict, model: str) -> dict | None:
    done = [t for t in block["trials"] if t["model"] == model and t["status"] == "completed"]
    return min(done, key=lambda t: t["val_loss"]) if done else None


def _named(trial: dict | None) -> str:
    return "none completed" if trial is None else f"{trial['trial']} r={trial['lora_r']} ({trial['val_loss']})"


def _where_asha_left(asha: dict, grid: dict) -> str:
    """Where the grid's most accurate trial went under ASHA, when ASHA did not score it."""
    top = _most_accurate(grid)
    if top is None:
        return ""
    there = next((t for t in asha["trials"] if t["trial"] == top["trial"]), None)
    if there is None or there["accuracy"] is not None:
        return ""
    return (f"; the grid's most accurate, {top['trial']} {top['model']} r={top['lora_r']} "
            f"(val loss {top['val_loss']}), was {there['status']} by ASHA after {there['epochs_done']} epoch(s)")


if __name__ == "__main__":
    for row in run():
        print(row)
