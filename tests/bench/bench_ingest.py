"""Ingest through Serve vs a no-op Serve endpoint vs the store's own insert rate (issue 2's bar).

The no-op is a plain FastAPI JSON endpoint (the body parsed, nothing done with it): the bar's
reference, which "reaches about a quarter" of the store's rate. The transport floor (bytes read,
never parsed) is reported beside it: no endpoint that parses its body can come near it. So is the
ceiling of any ingest endpoint here: the body parsed and its records stored exactly as /v1/logs
does, with nothing done at the door between (no validation, PII scrub, content ids or audit). Each
rate is the best of ROUNDS taken in turn. All of it twice, each in a Ray of its own: with Serve's
Python proxy in front of the replicas (Ray's default) and with HAProxy (`serve.ingress: haproxy`).
Last, the store alone as its table grows, with the time-ordered ids Flywheel makes and with random ones.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

from ray_app.config import load_settings
from ray_app.native import compiled_modules
from ray_app.schemas import normalize, record_id
from ray_app.simulator import generate
from ray_app.storage import open_log_store
from tests.bench.harness import latency_at_rate, start_app, start_ceiling, throughput

ROUNDS = 3
# settings serve.ingress -> what its rows' names add: Serve's Python proxy (Ray's default), or HAProxy
INGRESS = {"proxy": "", "haproxy": ", HAProxy ingress"}


def _records(n: int, tag: str) -> list[dict]:
    """Realistic customer-service records (~2.2 KB, 70% of it tool definitions), each unique."""
    out = []
    for i, rec in enumerate(generate("customer-service", n, seed=7, duplicate_rate=0.0)):
        rec = dict(rec, workload_id=f"bench-{tag}", timestamp=1_700_000_000 + i)
        out.append(rec)
    return out


def _bodies(records: list[dict], batch: int) -> list[bytes]:
    return [orjson.dumps({"records": records[i:i + batch]}) for i in range(0, len(records), batch)]


def _store_rate(settings, records: list[dict], batch: int) -> float:
    store = open_log_store(settings.with_overrides({"data_dir": str(settings.data_dir / "store-only")}))
    prepared = [normalize(r, constitutional_hash=settings.governance.constitutional_hash) for r in records]
    started = time.perf_counter()
    for i in range(0, len(prepared), batch):
        store.put_many(prepared[i:i + batch])
    return len(prepared) / (time.perf_counter() - started)


def _growth(settings, ids: str, rounds: int = 8, n: int = 20_000) -> tuple[float, float]:
    """The store's put_many rate (batch 1,000) into an empty table and after (rounds - 1) x n records:
    with time-ordered ids (what record_id and the client make) or random ones (uuid4)."""
    store = open_log_store(settings.with_overrides({"data_dir": str(settings.data_dir / f"growth-{ids}")}))
    prepared = [normalize(r, constitutional_hash=settings.governance.constitutional_hash) for r in _records(n, ids)]
    rates = []
    for k in range(rounds):
        batch = [dict(r, timestamp=r["timestamp"] + k * n,
                      id=record_id({**r, "timestamp": r["timestamp"] + k * n}) if ids == "time" else uuid.uuid4().hex)
                 for r in prepared]
        started = time.perf_counter()
        for i in range(0, n, 1000):
            store.put_many(batch[i:i + 1000])
        rates.append(n / (time.perf_counter() - started))
    return rates[0], rates[-1]


def run() -> list[dict]:
    rows = []
    for ingress in INGRESS:  # each in a Ray of its own: Ray reads the switch as its processes start
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            subprocess.run([sys.executable, "-m", "tests.bench.bench_ingest", ingress, str(out)], check=True,
                           env=dict(os.environ, RAY_ADDRESS=""))
            rows += orjson.loads(out.read_bytes())
    settings = load_settings(env={"FLYWHEEL_DATA_DIR": tempfile.mkdtemp(prefix="flywheel-bench-")})
    for ids, name in (("time", "time-ordered ids"), ("random", "random ids (uuid4)")):
        first, last = _growth(settings, ids)
        rows += [{"benchmark": "ingest", "metric": f"embedded store put_many records/s, {name}: empty -> 140k",
                  "value": last, "unit": "rec/s", "goal": "",
                  "note": f"{first:,.0f} rec/s into the empty table; batch 1000, in process"}]
    return rows


def _through_serve(ingress: str) -> list[dict]:
    url, settings = start_app(serve={"ingress": ingress})
    tag = INGRESS[ingress]
    ceiling = start_ceiling(url, settings)
    rows = []
    size = len(orjson.dumps(_records(1, "size")[0]))
    scrub = "compiled (mypyc)" if compiled_modules() else "Python (not compiled)"
    for batch, total in ((100, 20_000), (1000, 40_000)):
        # Best of ROUNDS for each, taken in turn: this machine's speed drifts within minutes, and
        # one slow moment on either side of a ratio would decide it. Fresh records every time.
        rates: dict[str, list[float]] = {"serve": [], "noop": [], "floor": [], "ceiling": [], "store": []}
        for r in range(ROUNDS):
            for name, target in (("serve", f"{url}/v1/logs"), ("noop", f"{url}/noop-json/"),
                                 ("floor", f"{url}/noop"), ("ceiling", ceiling)):
                bodies = _bodies(_records(total, f"{name}{batch}-{r}"), batch)
                rates[name].append(throughput(target, bodies) * batch)
            rates["store"].append(_store_rate(settings, _records(total, f"store{batch}-{r}"), batch))
        serve_rate, noop_rate, floor_rate, ceiling_rate, store_rate = (
            max(rates[k]) for k in ("serve", "noop", "floor", "ceiling", "store"))
        note = f"{size} B records, 4 concurrent posters, 2 CPUs, best of {ROUNDS}; PII scrub {scrub}"
        rows += [
            {"benchmark": "ingest", "metric": f"Serve /v1/logs records/s, batch {batch}{tag}",
             "value": serve_rate, "unit": "rec/s", "goal": "", "note": note},
            {"benchmark": "ingest", "metric": f"no-op Serve endpoint records/s, batch {batch}{tag}",
             "value": noop_rate, "unit": "rec/s", "goal": "",
             "note": "plain FastAPI JSON endpoint (one replica): body parsed into a dict, answers"},
            {"benchmark": "ingest", "metric": f"transport floor records/s, batch {batch}{tag}", "value": floor_rate,
             "unit": "rec/s", "goal": "", "note": "Serve endpoint reading the body's bytes, never parsing them"},
            {"benchmark": "ingest", "metric": f"parse + store ceiling records/s, batch {batch}{tag}",
             "value": ceiling_rate, "unit": "rec/s", "goal": "",
             "note": "the body parsed and stored as /v1/logs does, nothing done at the door between"},
            {"benchmark": "ingest", "metric": f"embedded store put_many records/s, batch {batch}{tag}",
             "value": store_rate, "unit": "rec/s", "goal": "", "note": "SQLite WAL, in process"},
            {"benchmark": "ingest", "metric": f"Serve / no-op, batch {batch}{tag}",
             "value": serve_rate / noop_rate, "unit": "x", "goal": ">= 0.8",
             "note": "PASS" if serve_rate / noop_rate >= 0.8 else "MISS"},
            {"benchmark": "ingest", "metric": f"Serve / store, batch {batch}{tag}",
             "value": serve_rate / store_rate, "unit": "x", "goal": ">= 0.5 at batch 1000" if batch == 1000 else "",
             "note": ("PASS" if serve_rate / store_rate >= 0.5 else "MISS") if batch == 1000 else ""},
            {"benchmark": "ingest", "metric": f"parse + store ceiling / store, batch {batch}{tag}",
             "value": ceiling_rate / store_rate, "unit": "x", "goal": "",
             "note": "the most an endpoint that parses and stores as /v1/logs does reaches here"},
        ]
    singles = [orjson.dumps(r) for r in _records(600, "single")]
    p50, p99 = latency_at_rate(f"{url}/v1/logs", singles, rate=50)
    rows += [{"benchmark": "ingest", "metric": f"single post latency p50 at 50 req/s{tag}", "value": p50 * 1000,
              "unit": "ms", "goal": "", "note": "open loop, 600 posts"},
             {"benchmark": "ingest", "metric": f"single post latency p99 at 50 req/s{tag}", "value": p99 * 1000,
              "unit": "ms", "goal": "", "note": ""}]
    return rows


if __name__ == "__main__":  # one ingress, in this process's own Ray: run() starts it
    Path(sys.argv[2]).write_bytes(orjson.dumps(_through_serve(sys.argv[1])))
