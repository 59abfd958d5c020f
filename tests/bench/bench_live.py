"""What measuring a served model on live traffic costs (issue 35, evals/live.py), per shadowed call.

Scoring runs off the caller's path: the gateway scores a call in `_with_other_side`, after the caller
has its answer and once the other side answered too (serve/gateway.py), so it adds nothing to a
caller's latency by construction; what a shadowed call costs the caller is bench_gateway's shadow row.
What it does cost is CPU on the ingress replica, measured here in-process with `time.process_time`:
- scoring one call (`agreement`): tool calls compared as the offline evaluation compares them; text by
  MiniLM cosine (two embeddings a call);
- judging a window (`live_stats` over the log store + the Rego `rollback` rule), which a replica does
  at most once a second per model, not per call.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from evals.live import agreement, live_stats
from ray_app.config import Settings
from ray_app.governance.policy import PolicyEngine
from ray_app.ingest import Ingest
from ray_app.storage import open_log_store
from serve.live import rollback_decision
from tests.workloads import customer_service_records, generic_records

TOOL_CALLS, TEXTS, WINDOW = 2000, 200, 200


def _cpu_per_call(pairs: list[tuple[dict, dict]]) -> float:
    started = time.process_time()
    for ours, theirs in pairs:
        agreement(ours, theirs)
    return (time.process_time() - started) / len(pairs)


def _scoring_rows() -> list[dict]:
    tools = [r["response"] for r in customer_service_records(TOOL_CALLS, seed=5)]
    tool_pairs = [(tools[i], tools[(i * 7) % len(tools)]) for i in range(len(tools))]  # agreeing and not
    texts = [r["response"] for r in generic_records(TEXTS, seed=5)]
    text_pairs = [(texts[i], texts[(i + 1) % len(texts)]) for i in range(len(texts))]
    agreement(*text_pairs[0])  # MiniLM loads once per replica, at its first text call: not per call
    tool_ms, text_ms = _cpu_per_call(tool_pairs) * 1e3, _cpu_per_call(text_pairs) * 1e3
    note = "CPU on the ingress replica after the caller's answer; the caller's latency is bench_gateway's shadow row"
    return [{"benchmark": "live", "metric": "scoring CPU per shadowed call, tool calls", "value": tool_ms,
             "unit": "ms", "goal": "off the hot path", "note": f"{TOOL_CALLS} calls; {note}"},
            {"benchmark": "live", "metric": "scoring CPU per shadowed call, text", "value": text_ms, "unit": "ms",
             "goal": "off the hot path", "note": f"{TEXTS} calls, two MiniLM embeddings each; {note}"}]


def _judging_row() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp))
        logs, door = open_log_store(settings), Ingest(settings)
        raws = []
        for i, record in enumerate(customer_service_records(WINDOW * 2, seed=6)):
            record |= {"id": f"gw-{i}", "workload_id": "w", "client_id": "c", "timestamp": time.time(),
                       "served_by": "upstream", "route": {"mode": "shadow", "model": "ft:m:1"},
                       "shadow": {"served_by": "ft:m:1", "agreement": {"name": 1.0, "args": 1.0}, "latency_ms": 90.0}}
            raws.append(record)
        logs.put_many(door.records(raws).records)
        engine = PolicyEngine.load(constitutional_hash=settings.governance.constitutional_hash)
        rounds, started = 20, time.process_time()
        for _ in range(rounds):
            stats = live_stats(logs, "ft:m:1", "w", "c", window=WINDOW)
            rollback_decision(engine, stats, threshold=0.9, min_window=30, max_error_rate=0.05, max_p99_ms=None)
        ms = (time.process_time() - started) / rounds * 1e3
    return {"benchmark": "live", "metric": "judging one window (read + rollback rule)", "value": ms, "unit": "ms",
            "goal": "", "note": f"window {WINDOW} on the embedded store; at most once a second per model and replica"}


def run() -> list[dict]:
    return [*_scoring_rows(), _judging_row()]
