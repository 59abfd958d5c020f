"""A finished job's customized models go into the model registry (ray_app/registry.py).

Every candidate that trained an adapter is registered, recommended or not: an operator may still
shadow a runner-up, and an auditor asks about every model that saw the workload's data. Each entry
keeps the job's own evidence: the customized evaluation's scores, the accuracy ratio the promotion
rule reads, the privacy spent, and, for the recommended model, the promotion decision.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evals.metrics import headline
from ray_app.config import Settings
from ray_app.registry import register
from ray_app.schemas import JobStatus
from ray_app.storage import open_job_store


def register_models(settings: Settings, job: dict[str, Any], report: dict[str, Any], outcomes: list[dict[str, Any]],
                    split_dir: Path) -> dict[str, Any]:
    """{"models": [registered ids]}: one per candidate whose training produced an adapter."""
    store = open_job_store(settings)
    train_ids = [e["id"] for e in json.loads((split_dir / "train.json").read_text())]
    splits = {k: report["splits"][k] for k in ("train", "val", "eval")}
    rec = report["recommendation"]
    registered = []
    for outcome, cand in zip(outcomes, report["candidates"], strict=True):
        training = outcome.get("training") or {}
        if outcome["status"] != JobStatus.COMPLETED or not training.get("adapter"):
            continue
        scores = cand["evaluations"].get("customized") or {}
        measured = (outcome["evaluations"].get("customized") or {}).get("generation") or {}
        recommended = rec.get("model") == cand["model"] and rec.get("eval_type") == "customized" and not rec.get(
            "trial")
        promotion = ({"recommended": True, "promoted": rec.get("promoted"), "decision": rec.get("policy_decision")}
                     if recommended else {"recommended": False})
        entry = register(store, data_dir=settings.data_dir, job=job, base_model=cand["model"],
                         adapter=Path(training["adapter"]), workload_type=report["workload_type"],
                         train_ids=train_ids, splits=splits, training=cand["training"], scores=scores,
                         accuracy_ratio=headline(scores) if scores else None, promotion=promotion,
                         max_new_tokens=measured.get("max_new_tokens"))
        registered.append(entry["id"])
    return {"models": registered}
