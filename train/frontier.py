"""The cost/accuracy Pareto frontier of a job's sweep, and the recommendation taken from it.

Points are every measured (model, adapter) pair: the candidates' base / ICL / customized
evaluations and every sweep trial that ran all its epochs and was scored. A point's cost is its
model's measured cost (report.py `candidate_cost`: tokens/s of batched generation on this
hardware, priced per hour); a LoRA adapter is merged before serving, so it adds nothing per token
and every adapter of a model shares the model's price. A point is on the frontier when no other
point is at least as cheap and more accurate. The recommendation is the cheapest frontier point
that meets the workload's threshold, with its cost reduction against the production model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from evals.metrics import headline
from ray_app.config import Settings

TRIAL_KEYS = ("trial", "lora_r", "learning_rate", "dp", "target_epsilon", "seed")
COST_KEYS = ("usd_per_million_tokens", "tokens_per_second", "latency_ms_p50")


def cost_of(candidate: dict[str, Any], source: str) -> dict[str, Any]:
    """The price of serving `candidate` as `source`: an eval type's own (in-context prompts carry
    their examples), else the model's (a sweep trial is a customized model, priced like one)."""
    return (candidate.get("cost_by_eval_type") or {}).get(source) or candidate.get("cost") or {}


def _point(cand: dict[str, Any], source: str, scores: dict[str, Any], trial: dict[str, Any] | None) -> dict[str, Any]:
    cost = cost_of(cand, source)
    return {"model": cand["model"], "source": source, **{k: (trial or {}).get(k) for k in TRIAL_KEYS},
            "accuracy": headline(scores), "compliance_rate": scores.get("compliance_rate"),
            **{k: cost.get(k) for k in COST_KEYS}, "parameters": cand.get("parameters")}


def points(candidates: list[dict[str, Any]], trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every priced, scored point: candidate evaluations, then scored sweep trials."""
    by_model = {c["model"]: c for c in candidates}
    out = [_point(c, eval_type, scores, None) for c in candidates
           for eval_type, scores in (c.get("evaluations") or {}).items() if scores]
    out += [_point(by_model[t["model"]], "sweep", t["scores"], t) for t in trials
            if t.get("scores") and t["model"] in by_model]
    return [p for p in out if p["accuracy"] is not None and p["usd_per_million_tokens"] is not None]


def pareto(pts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats on both cost and accuracy, cheapest first."""
    frontier, best = [], float("-inf")
    for p in sorted(pts, key=lambda p: (p["usd_per_million_tokens"], -p["accuracy"])):
        if p["accuracy"] > best:
            frontier.append(p)
            best = p["accuracy"]
    return frontier


def sweep_block(sweep: dict[str, Any], candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """report.json's `sweep`: the stage's trials (checkpoint paths dropped), all points and the frontier."""
    trials = [{k: v for k, v in t.items() if k not in ("checkpoint", "generation")}
              | {"accuracy": headline(t["scores"]) if t.get("scores") else None} for t in sweep["trials"]]
    pts = points(candidates, sweep["trials"])
    return {**{k: v for k, v in sweep.items() if k != "trials"}, "trials": trials, "points": pts,
            "frontier": pareto(pts), "models_on_frontier": sorted({p["model"] for p in pareto(pts)})}


def recommend_from_frontier(settings: Settings, workload_type: str, block: dict[str, Any]) -> dict[str, Any] | None:
    """The cheapest frontier point meeting the threshold, in `report.recommend`'s shape; None if none does."""
    threshold = settings.threshold_for(workload_type)
    meeting = [p for p in block["frontier"] if p["accuracy"] >= threshold]
    if not meeting:
        return None
    best = meeting[0]  # the frontier is cheapest first
    production = settings.cost.production_usd_per_million_tokens
    usd = best["usd_per_million_tokens"]
    return {"model": best["model"], "eval_type": "customized" if best["source"] == "sweep" else best["source"],
            "source": best["source"], **({k: best[k] for k in TRIAL_KEYS} if best["source"] == "sweep" else {}),
            "accuracy_ratio": round(best["accuracy"], 4),
            "cost_reduction": round(1 - usd / production, 4) if production else None,
            "usd_per_million_tokens": usd, "threshold": threshold, "promoted": False,
            "policy_decision": "pending governance",
            "reason": f"cheapest point on the sweep's cost/accuracy frontier with accuracy ratio >= {threshold}"}


def plot_frontier(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    block = report["sweep"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    models = sorted({p["model"] for p in block["points"]})
    for i, model in enumerate(models):
        mine = [p for p in block["points"] if p["model"] == model]
        ax.scatter([p["usd_per_million_tokens"] for p in mine], [p["accuracy"] for p in mine], s=28, alpha=0.7,
                   color=f"C{i}", label=f"{model} ({len(mine)} points)")
    front = block["frontier"]
    ax.step([p["usd_per_million_tokens"] for p in front], [p["accuracy"] for p in front], where="post",
            color="black", linewidth=1.2, label="Pareto frontier")
    threshold = block.get("threshold")
    if threshold is not None:
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {threshold}")
    rec = report["recommendation"]
    if rec.get("model") and rec.get("usd_per_million_tokens") is not None:
        ax.scatter([rec["usd_per_million_tokens"]], [rec["accuracy_ratio"]], s=160, facecolors="none",
                   edgecolors="red", linewidths=1.5, label="recommended")
    ax.set_xlabel("measured cost, $ / 1M generated tokens")
    ax.set_ylabel("accuracy vs production answers")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(f"cost/accuracy frontier: {report['workload_id']} ({block['scheduler']}, "
                 f"{len(block['trials'])} trials, {block['stopped_early']} stopped early)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(block: dict[str, Any]) -> list[str]:
    """report.md's sweep section: the frontier table, then one line per trial."""
    lines = ["## Cost/accuracy frontier", "",
             f"Sweep: {len(block['trials'])} trials, scheduler {block['scheduler']} on `{block['metric']}` "
             f"(max {block['max_epochs']} epochs), {block['stopped_early']} stopped early, "
             f"{block['trial_seconds_total']} trial-seconds in all.", "",
             "| model | source | trial | rank | lr | DP eps | accuracy | $/1M tok | tokens/s | p50 ms | params |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in block["frontier"]:
        lines.append(f"| {p['model']} | {p['source']} | {_f(p['trial'])} | {_f(p['lora_r'])} | "
                     f"{_f(p['learning_rate'])} | {_f(p['target_epsilon'])} | {_f(p['accuracy'])} | "
                     f"{_f(p['usd_per_million_tokens'])} | {_f(p['tokens_per_second'])} | "
                     f"{_f(p['latency_ms_p50'])} | {_f(p['parameters'])} |")
    lines += ["", "| trial | model | rank | lr | DP eps | status | epochs | val loss | accuracy | seconds |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for t in block["trials"]:
        status = t["status"] + (f": {t['error']}" if t.get("error") else "")
        lines.append(f"| {t['trial']} | {t['model']} | {t['lora_r']} | {t['learning_rate']} | "
                     f"{_f(t['target_epsilon'])} | {status} | {t['epochs_done']} | {_f(t['val_loss'])} | "
                     f"{_f(t['accuracy'])} | {t['trial_seconds']} |")
    return lines + ["", "![frontier](frontier.png)", ""]


def _f(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)
