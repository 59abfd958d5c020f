"""The job's report: report.json (contract keys), report.md and a plot, plus the recommendation.

Cost is measured, not looked up: after each evaluation a fixed probe (the same prompts, a fixed
number of new tokens, repeated: evals.generation.cost_probe) measures the model's rate on this
hardware, and its price is the hardware's price per hour (`cost.usd_per_cpu_hour` per CPU-hour
the tokens took, or `cost.usd_per_gpu_hour`) over the tokens it makes in that hour; the report
keeps each rate's median and range. The production model's price comes from the config. Each eval type
is also priced from its own run (`cost_by_eval_type`), and the recommendation uses that price:
in-context learning serves one model with every request carrying its examples, which the model
reads each time, so it makes fewer tokens an hour than the customized model answering bare prompts.

The recommendation is the cheapest candidate whose accuracy ratio meets the workload's
threshold (`governance.thresholds`). The production answers are the reference, so the
production model's own accuracy is 1.0 and the ratio is the candidate's headline score
(function-name accuracy for tool calling, similarity otherwise). `cost_reduction` is the
fraction of the production price saved (0.98 = 98% cheaper). Promotion is the governance
gate's decision (train/gates.py `promote`, run by the job right after `build_report`): it sets
`promoted` and `policy_decision` {allow, reasons, lane, rule}; until it runs, `promoted` is False
and `policy_decision` "pending governance".

Each candidate's `comparisons` pairs its evaluations example by example (evals.metrics.sign_test):
`customized_vs_icl` and `customized_vs_base` {wins, losses, ties, p_value}, so "the customized model
beats in-context learning" is a tested claim, not a difference of two noisy means.

With a sweep (train/sweep.py), report.json also has `sweep` {scheduler, trials, points, frontier, ...}
(train/frontier.py), report.md its frontier table, frontier.png sits beside accuracy.png, and the
recommendation is the cheapest frontier point that meets the threshold (a sweep trial carries its
`trial` id and choices); when no frontier point does, it is `recommend`'s.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from evals.live import live_stats
from evals.metrics import headline, sign_test
from ray_app.config import Settings
from ray_app.registry import get_model
from ray_app.routes import get_route
from ray_app.schemas import JobStatus
from ray_app.storage import open_job_store, open_log_store
from train import frontier, report_view
from train.candidate import EVAL_TYPES, TRAINING_KEYS
from train.jobstate import write_json

CONTRACT_SCORE_KEYS = ("function_name_accuracy", "function_args_accuracy", "similarity", "compliance_rate", "n")


def candidate_cost(settings: Settings, evaluations: dict[str, Any]) -> dict[str, Any] | None:
    """The model's price: from the customized model's generation if it ran, else the base model's."""
    run = evaluations.get("customized") or evaluations.get("base")
    return _price(settings, run) if run else None


def prices(settings: Settings, evaluations: dict[str, Any]) -> dict[str, Any]:
    """A candidate's `cost` (the model's price) and `cost_by_eval_type` (each eval run's own price)."""
    return {"cost": candidate_cost(settings, evaluations),
            "cost_by_eval_type": {t: _price(settings, evaluations[t]) for t in EVAL_TYPES if evaluations.get(t)}}


def _price(settings: Settings, run: dict[str, Any]) -> dict[str, Any]:
    """The price per 1M tokens of one eval run. With its cost probe (evals.generation.cost_probe): on a
    CPU, from the median tokens per CPU-second (load on the machine does not move it much); on a GPU,
    from the median wall-clock rate. Without one (older runs), from the evaluation's own rate."""
    gen, probe, gpu = run["generation"], run.get("probe"), settings.training.use_gpu
    cpus = run.get("cpus", 1)
    if probe:
        tps, latency = probe["tokens_per_second"]["median"], probe["latency_ms_p50"]["median"]
        rate, per_hour = ((tps, settings.cost.usd_per_gpu_hour) if gpu else
                          (probe["cpu_tokens_per_second"]["median"], settings.cost.usd_per_cpu_hour))
    else:
        tps, latency = gen["tokens_per_second"], gen["latency_ms_p50"]
        rate, per_hour = tps, settings.cost.usd_per_gpu_hour if gpu else settings.cost.usd_per_cpu_hour * cpus
    usd = per_hour / (rate * 3600) * 1e6 if rate > 0 else None
    out = {"tokens_per_second": round(tps, 2), "latency_ms_p50": round(latency, 1),
           "usd_per_million_tokens": round(usd, 4) if usd is not None else None,
           "batch_size": gen["batch_size"], "matmul_dtype": run.get("matmul_dtype", "float32"),
           "hardware": "gpu" if gpu else f"{cpus} cpu"}
    if probe:
        out["probe"] = {k: probe[k] for k in ("tokens_per_second", "cpu_tokens_per_second", "repeats", "new_tokens",
                                              "prompts")}
    return out


def _scores(run: dict[str, Any] | None) -> dict[str, Any] | None:
    if not run:
        return None
    scores = run["scores"]
    return {k: v for k, v in scores.items() if k in CONTRACT_SCORE_KEYS or k.endswith("_ci")
            or k == "compliance_check"}


COMPARISONS = (("customized", "icl"), ("customized", "base"))


def comparisons(evaluations: dict[str, Any]) -> dict[str, Any]:
    """Each pair of COMPARISONS that both ran, on the examples both scored (None if they share none)."""
    out: dict[str, Any] = {}
    for a, b in COMPARISONS:
        for key, suffix in (("per_example", ""), ("per_example_args", "_args")):  # headline, then whole calls
            left, right = ((evaluations.get(t) or {}).get(key) for t in (a, b))
            if left and right:
                common = [i for i in left if i in right]
                out[f"{a}_vs_{b}{suffix}"] = (sign_test([left[i] for i in common], [right[i] for i in common])
                                              if common else None)
    return out


def recommend(settings: Settings, workload_type: str, candidates: list[dict[str, Any]]) -> dict[str, Any]:
    threshold = settings.threshold_for(workload_type)
    production_usd = settings.cost.production_usd_per_million_tokens
    options = []
    for cand in candidates:
        for eval_type in EVAL_TYPES:
            scores = (cand.get("evaluations") or {}).get(eval_type)
            usd = frontier.cost_of(cand, eval_type).get("usd_per_million_tokens")
            ratio = headline(scores) if scores else None
            if ratio is not None and usd is not None and ratio >= threshold:
                options.append((usd, -ratio, cand["model"], eval_type, ratio))
    if not options:
        best = max(((headline(s), c["model"], t) for c in candidates for t, s in (c.get("evaluations") or {}).items()
                    if s and headline(s) is not None), default=None)
        why = (f"best was {best[1]} ({best[2]}) at {best[0]:.3f}" if best else "no candidate was evaluated")
        return {"model": None, "eval_type": None, "accuracy_ratio": None, "cost_reduction": None,
                "promoted": False, "policy_decision": "none",
                "reason": f"no candidate reached the {workload_type} accuracy threshold {threshold}; {why}"}
    usd, _, model, eval_type, ratio = min(options)
    return {"model": model, "eval_type": eval_type, "accuracy_ratio": round(ratio, 4),
            "cost_reduction": round(1 - usd / production_usd, 4) if production_usd else None,
            "usd_per_million_tokens": usd, "threshold": threshold, "promoted": False,
            "policy_decision": "pending governance",
            "reason": f"cheapest candidate with accuracy ratio >= {threshold}"}


def live_view(settings: Settings, workload_id: str, client_id: str) -> dict[str, Any] | None:
    """The model the gateway routes this workload to now and its live window (evals/live.py): what this
    job's candidates stand beside. None while the production upstream answers alone."""
    jobs = open_job_store(settings)
    route = get_route(jobs, workload_id, client_id)
    if route.model is None or route.mode == "off":
        return None
    model = get_model(jobs, route.model)
    stats = live_stats(open_log_store(settings), route.model, workload_id, client_id,
                       window=settings.gateway.window_size)
    return {"model": route.model, "mode": route.mode, "trained_by_job": model.get("job_id"),
            "offline_accuracy_ratio": model.get("accuracy_ratio"), **stats}


def build_report(settings: Settings, job: dict[str, Any], splits: dict[str, Any],
                 outcomes: list[dict[str, Any]], sweep: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report; with a sweep's result, also its `sweep` block and a recommendation from its frontier."""
    candidates = []
    for outcome in outcomes:
        evals = outcome["evaluations"]
        training = outcome.get("training") or {}
        params = next((run["parameters"] for run in evals.values() if run and "parameters" in run), None)
        candidates.append({
            "model": outcome["model"], "status": outcome["status"], "error": outcome.get("error"),
            "parameters": params,
            "evaluations": {t: _scores(evals.get(t)) for t in EVAL_TYPES},
            # the same examples decoded without the tools' grammar (evaluation.compare_free)
            "free_evaluations": {t: _scores((evals.get(t) or {}).get("free")) for t in EVAL_TYPES},
            "training": {k: training.get(k) for k in (*TRAINING_KEYS, "privacy_budget")},
            "comparisons": comparisons(evals),
            **prices(settings, evals),
        })
    icl = _icl_summary(settings, job)
    recommendation = recommend(settings, splits["workload_type"], candidates)
    block = None
    if sweep is not None:
        block = frontier.sweep_block(sweep, candidates) | {"threshold": settings.threshold_for(splits["workload_type"])}
        recommendation = frontier.recommend_from_frontier(settings, splits["workload_type"], block) or recommendation
    report = {
        "job_id": job["id"], "workload_id": job["workload_id"], "client_id": job["client_id"],
        "constitutional_hash": job.get("constitutional_hash") or settings.governance.constitutional_hash,
        "workload_type": splits["workload_type"], "num_records": splits["num_records"],
        "curation": splits["curation"],
        "splits": {"eval": splits["eval"], "train": splits["train"], "val": splits["val"], "icl_examples": icl},
        "candidates": candidates,
        "production": {"model": settings.cost.production_model,
                       "usd_per_million_tokens": settings.cost.production_usd_per_million_tokens},
        "recommendation": recommendation,
        "threshold": settings.threshold_for(splits["workload_type"]),
        "live": live_view(settings, job["workload_id"], job["client_id"]),
        # the stages that ended: this report is written inside the last one, which ends right after
        "stages": [{k: s.get(k) for k in ("name", "status", "started_at", "finished_at", "error")}
                   for s in job["stages"] if s["status"] != JobStatus.RUNNING],
        "written_at": time.time(),
    }
    if block is not None:
        report["sweep"] = block
    return report


def _icl_summary(settings: Settings, job: dict[str, Any]) -> int:
    stage = next((s for s in job["stages"] if s["name"] == "select_icl"), None)
    return int((stage or {}).get("result", {}).get("icl_examples", 0))


def write_report(report: dict[str, Any], out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    report["plot"] = str(report_view.plot_accuracy(report, out / "accuracy.png"))
    if report.get("sweep"):
        report["sweep"]["plot"] = str(frontier.plot_frontier(report, out / "frontier.png"))
    (out / "report.md").write_text(report_view.markdown(report))
    write_json(out / "report.json", report)
    return report
