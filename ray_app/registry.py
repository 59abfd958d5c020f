"""The model registry: every customized candidate a job trains, versioned, with where it stands.

A registered model is what an auditor asks about and what the gateway serves: the base model and
its adapter (copied out of the job's folder into `<data_dir>/models/registry/<id>/`, so deleting a
report never breaks a served model), the job and workload it came from, a digest of exactly the
training records it saw, the privacy it spent, its offline scores and the promotion decision, and
its state with every change kept in `history`:

    registered -> shadow -> canary -> live -> retired
                      \\________\\_______\\-> rolled_back

Models live in the job store's `models` collection (embedded SQLite or MongoDB, as jobs do).
`GET /v1/models` lists them in OpenAI's shape (`{"object": "list", "data": [{"id", "object":
"model", "created", "owned_by"}]}`) with Flywheel's fields added beside OpenAI's.
"""
from __future__ import annotations

import hashlib
import shutil
import time
from enum import Enum
from pathlib import Path
from typing import Any

from ray_app.errors import Conflict, NotFound
from ray_app.storage.base import JobStore

COLLECTION = "models"


class ModelState(str, Enum):
    REGISTERED = "registered"
    SHADOW = "shadow"
    CANARY = "canary"
    LIVE = "live"
    RETIRED = "retired"
    ROLLED_BACK = "rolled_back"


SERVING = frozenset({ModelState.SHADOW, ModelState.CANARY, ModelState.LIVE})


def model_id(base_model: str, job_id: str) -> str:
    """`ft:<base>:<job>`, OpenAI's fine-tuned id form: one model per base model and job."""
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(base_model).name)[-48:]
    return f"ft:{base}:{job_id}"


def records_digest(record_ids: list[str]) -> str:
    """SHA-256 over the sorted ids of the training records: which data a model saw, without the data."""
    return hashlib.sha256("\n".join(sorted(record_ids)).encode()).hexdigest()


def register(store: JobStore, *, data_dir: Path, job: dict[str, Any], base_model: str, adapter: Path,
             workload_type: str, train_ids: list[str], splits: dict[str, int], training: dict[str, Any],
             scores: dict[str, Any], accuracy_ratio: float | None, promotion: dict[str, Any] | None,
             max_new_tokens: int | None = None) -> dict[str, Any]:
    """Register (or, for a re-run of the same job, refresh) one customized model; returns its entry."""
    mid = model_id(base_model, job["id"])
    home = data_dir / "models" / "registry" / mid.replace(":", "_")
    target = home / "adapter"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(adapter, target)
    now = time.time()
    entry = {
        "id": mid, "base_model": base_model, "adapter": str(target), "job_id": job["id"],
        "workload_id": job["workload_id"], "client_id": job["client_id"], "workload_type": workload_type,
        "training_data": {"records_digest": records_digest(train_ids), "splits": splits},
        "privacy": {k: training.get(k) for k in ("epsilon", "delta", "noise_multiplier", "steps")},
        "training": {k: v for k, v in training.items() if k != "adapter"},
        "scores": scores, "accuracy_ratio": accuracy_ratio, "promotion": promotion,
        "max_new_tokens": max_new_tokens,  # the answer budget it was evaluated with: served with the same
    }

    def mutate(doc: dict[str, Any]) -> None:
        state = doc.get("state", ModelState.REGISTERED.value)
        history = doc.get("history") or [{"state": ModelState.REGISTERED.value, "at": now, "reason": "trained"}]
        doc.update(entry, state=state, history=history, created=int(doc.get("created", now)))
    return store.update_doc(COLLECTION, mid, mutate)


def get_model(store: JobStore, mid: str) -> dict[str, Any]:
    doc = store.get_doc(COLLECTION, mid)
    if doc is None:
        raise NotFound(f"no registered model with id {mid!r}", field="model")
    return doc


def list_models(store: JobStore, *, workload_id: str | None = None) -> list[dict[str, Any]]:
    docs = [doc for _, doc in store.list_docs(COLLECTION)]
    return [d for d in docs if workload_id is None or d["workload_id"] == workload_id]


def models_of_job(store: JobStore, job_id: str) -> list[dict[str, Any]]:
    return [d for d in list_models(store) if d["job_id"] == job_id]


def model_for_target(store: JobStore, target: str) -> dict[str, Any]:
    """A model id, or a job id: that job's recommended model, else its best customized one by accuracy."""
    if store.get_doc(COLLECTION, target) is not None:
        return get_model(store, target)
    models = models_of_job(store, target)
    if not models:
        raise NotFound(f"{target!r} is neither a registered model nor a job that registered one", field="target")
    recommended = [m for m in models if (m.get("promotion") or {}).get("recommended")]
    return (recommended or sorted(models, key=lambda m: -(m.get("accuracy_ratio") or 0.0)))[0]


# Which states may follow which: a retired or rolled-back model comes back only through shadow.
MOVES = {
    ModelState.REGISTERED: {ModelState.SHADOW, ModelState.CANARY, ModelState.LIVE, ModelState.RETIRED},
    ModelState.SHADOW: {ModelState.CANARY, ModelState.LIVE, ModelState.RETIRED, ModelState.ROLLED_BACK,
                        ModelState.REGISTERED},
    ModelState.CANARY: {ModelState.SHADOW, ModelState.LIVE, ModelState.RETIRED, ModelState.ROLLED_BACK,
                        ModelState.REGISTERED},
    ModelState.LIVE: {ModelState.SHADOW, ModelState.CANARY, ModelState.RETIRED, ModelState.ROLLED_BACK,
                      ModelState.REGISTERED},
    ModelState.RETIRED: {ModelState.SHADOW, ModelState.REGISTERED},
    ModelState.ROLLED_BACK: {ModelState.SHADOW, ModelState.REGISTERED},
}


def set_state(store: JobStore, mid: str, state: ModelState, *, reason: str) -> dict[str, Any]:
    """Move a model to `state`, keeping the change in its history; Conflict for a move MOVES does not allow."""
    def mutate(doc: dict[str, Any]) -> None:
        if not doc:
            raise NotFound(f"no registered model with id {mid!r}", field="model")
        current = ModelState(doc["state"])
        if state != current and state not in MOVES[current]:
            raise Conflict(f"model {mid!r} is {current.value}: it cannot move to {state.value} "
                           f"(allowed: {', '.join(sorted(s.value for s in MOVES[current]))})", field="mode")
        if state != current:
            doc["state"] = state.value
            doc["history"].append({"state": state.value, "at": time.time(), "reason": reason})
    return store.update_doc(COLLECTION, mid, mutate)  # an unknown id: mutate raises before anything is written


def openai_view(doc: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's model object first (`id`, `object`, `created`, `owned_by`), Flywheel's fields after."""
    extra = {k: v for k, v in doc.items() if k not in ("id", "created")}
    return {"id": doc["id"], "object": "model", "created": doc["created"], "owned_by": "flywheel", **extra}
