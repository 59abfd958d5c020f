"""The privacy ledger: every DP training of a (workload, client), composed with Opacus's RDP accountant.

Each DP-LoRA run is a subsampled Gaussian mechanism (noise_multiplier, sample_rate, steps). The
ledger is one JobStore document per (workload_id, client_id) in the `privacy` collection, holding
the runs in order; appends go through `update_doc`, so concurrent jobs never lose a run. The
epsilon spent is not the sum of the runs' epsilons: the RDP accountant composes the mechanisms
at one order alpha and converts once, which is tighter than adding (epsilon, delta) pairs.

Accounting is per record (individual privacy, as in "parallel composition"): each run names the
records it trained on (their ids, in a `privacy_records` document of its own), a record composes only
the runs that used it, and the workload's spend is its most exposed record's. Runs on disjoint
records do not add up; runs that reuse records do. A run recorded without its ids counts against
every record.

`privacy.budget_epsilon` is the cap on that spend (a default is set: retraining spends privacy).
Before a training starts, the job computes what the ledger would read after it
(`prospective_epsilon`: the history plus the mechanism Opacus will pick for `target_epsilon`, on
the records it would use) and hands the policy the budget left for it; over budget, the job may
train on the records no earlier run used (`fresh_ids`) instead.

A second document (`privacy_index/ledgers`) lists the ledgers' keys, so `/metrics` and
`flywheel privacy show` can find them without a list operation on the store.
"""
from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from ray_app.storage.base import JobStore

COLLECTION = "privacy"
RECORDS = "privacy_records"  # one document per run: the ids of the records it trained on
INDEX = ("privacy_index", "ledgers")
SEP = "\x1f"

Mechanism = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), Opacus's history entry


def ledger_id(workload_id: str, client_id: str) -> str:
    return f"{workload_id}{SEP}{client_id}"


def composed_epsilon(mechanisms: Iterable[Mechanism], delta: float) -> float:
    """Epsilon at `delta` of all mechanisms run one after another (RDP composition); 0.0 for none."""
    from opacus.accountants import RDPAccountant

    history = [(float(n), float(q), int(s)) for n, q, s in mechanisms if s > 0]
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = history
    return float(accountant.get_epsilon(delta))


def planned_steps(*, num_examples: int, batch_size: int, epochs: int, max_steps: int | None) -> tuple[float, int]:
    """(sample rate, steps) of a training run: Poisson sampling draws each example with probability
    1 / (batches per epoch), for that many steps per epoch, up to `max_steps` in all."""
    batches = max(1, math.ceil(num_examples / batch_size))
    steps = epochs * batches
    return 1 / batches, steps if max_steps is None else min(steps, max_steps)


def planned_mechanism(*, num_examples: int, batch_size: int, epochs: int, max_steps: int | None,
                      target_epsilon: float, delta: float) -> Mechanism:
    """The mechanism train/dp.py will use for this data: the noise multiplier solved for
    `target_epsilon` over the planned steps."""
    from opacus.accountants.utils import get_noise_multiplier

    sample_rate, steps = planned_steps(num_examples=num_examples, batch_size=batch_size, epochs=epochs,
                                       max_steps=max_steps)
    noise = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                 steps=steps, accountant="rdp")
    return float(noise), sample_rate, steps


def runs_of(ledger: dict[str, Any] | None) -> list[dict[str, Any]]:
    return list((ledger or {}).get("runs") or [])


def mechanisms(runs: Sequence[dict[str, Any]]) -> list[Mechanism]:
    return [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in runs]


def read_ledger(store: JobStore, workload_id: str, client_id: str) -> dict[str, Any]:
    return store.get_doc(COLLECTION, ledger_id(workload_id, client_id)) or {
        "workload_id": workload_id, "client_id": client_id, "runs": []}


def record_run(store: JobStore, *, workload_id: str, client_id: str, job_id: str, model: str,
               noise_multiplier: float, sample_rate: float, steps: int, delta: float,
               epsilon: float | None = None, record_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Append one finished DP training to the ledger (atomically), with the ids of the records it
    trained on (None: unknown, it then counts against every record); returns the ledger."""
    run = {"job_id": job_id, "model": model, "noise_multiplier": float(noise_multiplier),
           "sample_rate": float(sample_rate), "steps": int(steps), "delta": float(delta),
           "epsilon": epsilon, "at": time.time(), "records": None}
    if record_ids is not None:
        ids = sorted(set(record_ids))
        run.update(records=f"{ledger_id(workload_id, client_id)}{SEP}{uuid.uuid4().hex}", num_records=len(ids))
        store.update_doc(RECORDS, run["records"], lambda doc: doc.update(ids=ids))

    def append(doc: dict[str, Any]) -> None:
        doc.update(workload_id=workload_id, client_id=client_id)
        doc.setdefault("runs", []).append(run)

    ledger = store.update_doc(COLLECTION, ledger_id(workload_id, client_id), append)
    key = [workload_id, client_id]

    def index(doc: dict[str, Any]) -> None:
        keys = doc.setdefault("keys", [])
        if key not in keys:
            keys.append(key)

    store.update_doc(*INDEX, index)
    return ledger


def ledger_keys(store: JobStore) -> list[tuple[str, str]]:
    doc = store.get_doc(*INDEX) or {}
    return [(w, c) for w, c in doc.get("keys", [])]


RecordSet = frozenset[str] | None  # the ids a run trained on; None: unknown (every record)


def record_sets(store: JobStore, ledger: dict[str, Any]) -> list[RecordSet]:
    """Per run of the ledger, in order, the ids it trained on."""
    return [frozenset((store.get_doc(RECORDS, run["records"]) or {}).get("ids", [])) if run.get("records") else None
            for run in runs_of(ledger)]


def spent_per_record(history: Sequence[Mechanism], sets: Sequence[RecordSet], delta: float) -> float:
    """The epsilon of the most exposed record: each record composes the runs that trained on it."""
    known = set().union(*(s for s in sets if s is not None))
    groups = {tuple(i for i, s in enumerate(sets) if s is None or record in s) for record in known}
    if any(s is None for s in sets):  # records no recorded run names: the runs without ids used them
        groups.add(tuple(i for i, s in enumerate(sets) if s is None))
    return max((composed_epsilon([history[i] for i in group], delta) for group in groups if group), default=0.0)


def fresh_ids(ids: Iterable[str], sets: Sequence[RecordSet]) -> list[str]:
    """The ids no earlier run trained on (none, when a run without ids may have used any)."""
    if any(s is None for s in sets):
        return []
    used = set().union(*sets)
    return [i for i in ids if i not in used]


def summary(ledger: dict[str, Any], sets: Sequence[RecordSet], *, delta: float,
            budget_epsilon: float | None) -> dict[str, Any]:
    """What `flywheel privacy show` prints and `/metrics` exports for one ledger."""
    runs = runs_of(ledger)
    spent = spent_per_record(mechanisms(runs), sets, delta)
    return {"workload_id": ledger["workload_id"], "client_id": ledger["client_id"], "runs": len(runs),
            "records": len(set().union(*(s for s in sets if s is not None))), "epsilon_spent": spent,
            "delta": delta, "budget_epsilon": budget_epsilon,
            "budget_remaining": None if budget_epsilon is None else budget_epsilon - spent}


def prospective_epsilon(ledger: dict[str, Any], sets: Sequence[RecordSet], planned: Mechanism,
                        planned_ids: Iterable[str], *, delta: float) -> tuple[float, float]:
    """(epsilon spent so far, epsilon after the planned run on `planned_ids`), per record, at `delta`."""
    history = mechanisms(runs_of(ledger))
    return (spent_per_record(history, sets, delta),
            spent_per_record([*history, planned], [*sets, frozenset(planned_ids)], delta))
