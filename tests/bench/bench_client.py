"""Client benchmarks: what log() costs the caller, and what the client delivers end to end.

    run(server_url=None, api_key=None) -> rows

- log() overhead, p50/p99/max in microseconds, measured per call while the sender thread is busy
  posting (the caller keeps logging in bursts, so there is always a batch in flight); also the
  overflow path (queue full -> one spool write on the caller's thread).
- End-to-end records/s through the client (log N, flush) next to raw batch posts (httpx posting the
  same batches, orjson-encoded, one after another): the difference is the client's own cost.

Without a server_url the target is the real Serve app, started by `harness.start_app()` (Ray, the
app, embedded stores; its proxy and replica are their own processes, so the server's work does not
share the benchmark's GIL); pass another app's URL and a key to measure against that one.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
import uuid

import httpx
import orjson

from ray_app.client import FlywheelClient, new_record_id

BATCH, E2E_RECORDS = 500, 10_000


def record(i: int, workload_id: str) -> dict:
    return {"workload_id": workload_id, "client_id": "bench",
            "request": {"model": "m", "messages": [{"role": "system", "content": "You are a support agent."},
                                                   {"role": "user", "content": f"Where is order {i}?"}]},
            "response": {"choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": f"Order {i} ships tomorrow from the Lyon warehouse."}}]}}


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e3  # noqa: E731
    return {"p50": pick(0.50), "p99": pick(0.99), "max": ordered[-1] / 1e3}


def log_overhead(url: str, api_key: str, *, bursts: int = 40, burst: int = 1_000) -> tuple[dict, dict, dict]:
    """Per-call log() time while the sender is busy; then the same with the queue full (spooling)."""
    workload = f"bench-{uuid.uuid4().hex[:8]}"
    busy, overflow = [], []
    with tempfile.TemporaryDirectory() as spool:
        client = FlywheelClient(url, api_key=api_key, spool_dir=spool, batch_size=BATCH)
        records = [record(i, workload) for i in range(bursts * burst)]
        for start in range(0, len(records), burst):
            for rec in records[start:start + burst]:
                t0 = time.perf_counter_ns()
                client.log(rec)
                busy.append(time.perf_counter_ns() - t0)
            time.sleep(0.005)  # a service does other work between calls; the sender keeps posting
        stats_busy = client.stats()
        client.flush(120)
        client.close()
        small = FlywheelClient(url, api_key=api_key, spool_dir=spool, batch_size=BATCH, max_queue=BATCH)
        for rec in records[:5_000]:
            t0 = time.perf_counter_ns()
            small.log(rec)
            overflow.append(time.perf_counter_ns() - t0)
        stats_overflow = small.stats()
        small.flush(120)
        small.close()
    return _percentiles(busy), _percentiles(overflow), {"busy": stats_busy, "overflow": stats_overflow}


def end_to_end(url: str, api_key: str, n: int = E2E_RECORDS, rounds: int = 5) -> tuple[float, float, float]:
    """Median records/s through the client (log + flush), through raw sequential batch posts, and
    the median of the per-round ratios.

    Rounds alternate the two, and the ratio is taken within a round, so a server that slows as its
    store grows, or a neighbour's load on the machine, weighs on both alike."""
    via_client, raw = [], []
    for _ in range(rounds):
        via_client.append(_through_client(url, api_key, n))
        raw.append(_raw_posts(url, api_key, n))
    ratios = [c / r for c, r in zip(via_client, raw, strict=True)]
    return statistics.median(via_client), statistics.median(raw), statistics.median(ratios)


def _through_client(url: str, api_key: str, n: int) -> float:
    records = [record(i, f"bench-{uuid.uuid4().hex[:8]}") for i in range(n)]
    with tempfile.TemporaryDirectory() as spool:
        client = FlywheelClient(url, api_key=api_key, spool_dir=spool, batch_size=BATCH)
        t0 = time.perf_counter()
        for rec in records:
            client.log(rec)
        if not client.flush(300):
            raise RuntimeError(f"the client did not deliver everything: {client.stats()}")
        elapsed = time.perf_counter() - t0
        client.close()
    return n / elapsed


def _raw_posts(url: str, api_key: str, n: int) -> float:
    workload = f"bench-{uuid.uuid4().hex[:8]}"
    records = [{**record(i, workload), "id": new_record_id()} for i in range(n)]  # as log() gives them
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {api_key}",
                                                         "Content-Type": "application/json"}) as http:
        t0 = time.perf_counter()
        for start in range(0, n, BATCH):
            http.post("/v1/logs", content=orjson.dumps({"records": records[start:start + BATCH]})).raise_for_status()
        return n / (time.perf_counter() - t0)


def run(server_url: str | None = None, api_key: str | None = None) -> list[dict]:
    if server_url is None:
        from tests.bench import harness

        url, _ = harness.start_app()
        return _rows(url, harness.ADMIN_KEY, "the real Serve app (harness.start_app, embedded stores)")
    return _rows(server_url, api_key or "", server_url)


def _rows(url: str, api_key: str, target: str) -> list[dict]:
    busy, overflow, stats = log_overhead(url, api_key)
    via_client, raw, ratio = end_to_end(url, api_key)
    during = stats["busy"]
    note = (f"40k calls in bursts of 1k while the sender posts 500-record batches ({during['sent']} sent "
            f"during, {during['queued']} still queued at the end: it never idled); target: {target}")
    rows = [{"benchmark": "client_log_overhead", "metric": m, "value": round(busy[m], 2), "unit": "us",
             "goal": "< 100" if m == "p99" else "", "note": note} for m in ("p50", "p99", "max")]
    rows += [{"benchmark": "client_log_overhead_queue_full", "metric": m, "value": round(overflow[m], 2),
              "unit": "us", "goal": "", "note": f"max_queue=500: each call spools one line "
              f"({stats['overflow']['spooled']} of 5000 spooled)"} for m in ("p50", "p99")]
    rows += [
        {"benchmark": "client_end_to_end", "metric": "records_per_s", "value": round(via_client),
         "unit": "records/s", "goal": ">= 0.8 x raw",
         "note": f"median of 5 rounds of log {E2E_RECORDS} + flush; target: {target}"},
        {"benchmark": "client_end_to_end", "metric": "raw_batch_posts_records_per_s", "value": round(raw),
         "unit": "records/s", "goal": "", "note": f"httpx posting {BATCH}-record batches in sequence, "
                 "rounds alternating with the client's"},
        {"benchmark": "client_end_to_end", "metric": "client_over_raw", "value": round(ratio, 3),
         "unit": "ratio", "goal": ">= 0.8",
         "note": "median of the per-round ratios; 1.0 = the client adds nothing over hand-made batch posts"},
    ]
    return rows


if __name__ == "__main__":
    for row in run(*sys.argv[1:3]):
        print(f"{row['benchmark']:32} {row['metric']:32} {row['value']:>12} {row['unit']:10} {row['goal']:14} "
              f"{row['note']}")
