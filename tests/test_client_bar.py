"""THE BAR: 20,000 records posted through the client while the ingest server is stopped and
restarted twice; every record arrives exactly once.

By default the target is the stand-in ingest server (tests/standin_ingest.py). To run the same
test against the real Serve app, export:
    FLYWHEEL_TEST_SERVE_URL    e.g. http://127.0.0.1:8000
    FLYWHEEL_TEST_API_KEY      a key allowed to POST and GET /v1/logs (e.g. FLYWHEEL_ADMIN_KEY's value)
    FLYWHEEL_TEST_SERVE_STOP   shell command that makes the service unreachable (or its store down: 503)
    FLYWHEEL_TEST_SERVE_START  shell command that brings it back; the test then waits for /healthz
The records are read back with GET /v1/logs?workload_id=W&client_id=C&limit=N, so the check is
the same for both targets: the ids stored for this run's fresh workload_id are exactly the ids
log() returned, each once.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections import Counter

import httpx
import pytest

from ray_app.client import FlywheelClient
from tests.standin_ingest import IngestStandIn, free_port, make_record

TOTAL, OUTAGE_S = 20_000, 1.0


class StandInTarget:
    def __init__(self) -> None:
        self.server = IngestStandIn(api_key="bar-key", port=free_port()).start()
        self.url, self.api_key = self.server.url, "bar-key"

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()

    def close(self) -> None:
        self.server.stop()


class ServeTarget:
    """The real Serve app, stopped and started by the commands the environment names."""

    def __init__(self, url: str) -> None:
        self.url, self.api_key = url.rstrip("/"), os.environ["FLYWHEEL_TEST_API_KEY"]
        self._stop, self._start = os.environ["FLYWHEEL_TEST_SERVE_STOP"], os.environ["FLYWHEEL_TEST_SERVE_START"]

    def stop(self) -> None:
        subprocess.run(self._stop, shell=True, check=True)

    def start(self) -> None:
        subprocess.run(self._start, shell=True, check=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.url} did not come back")

    def close(self) -> None:
        pass


@pytest.fixture
def target():
    url = os.environ.get("FLYWHEEL_TEST_SERVE_URL")
    chosen = ServeTarget(url) if url else StandInTarget()
    yield chosen
    chosen.close()


def stored_ids(target, workload_id: str) -> Counter[str]:
    answer = httpx.get(f"{target.url}/v1/logs", params={"workload_id": workload_id, "client_id": "acme",
                                                         "limit": 2 * TOTAL},
                       headers={"Authorization": f"Bearer {target.api_key}"}, timeout=60)
    answer.raise_for_status()
    return Counter(record["id"] for record in answer.json()["records"])


def test_every_record_arrives_exactly_once_across_two_restarts(target, tmp_path):
    workload = f"bar-{uuid.uuid4().hex[:8]}"
    client = FlywheelClient(target.url, api_key=target.api_key, spool_dir=tmp_path / "spool",
                            spool_after=0.5, max_backoff=0.5, flush_interval=0.1)
    ids: list[str] = []

    def produce() -> None:  # a service logging steadily, about 5,000 records a second
        for i in range(TOTAL):
            ids.append(client.log(make_record(i, workload_id=workload)))
            if i % 100 == 99:
                time.sleep(0.02)

    producer = threading.Thread(target=produce)
    producer.start()
    for mark in (TOTAL // 5, TOTAL // 2):  # stop and restart twice while records keep coming
        while len(ids) < mark and producer.is_alive():
            time.sleep(0.01)
        target.stop()
        time.sleep(OUTAGE_S)
        target.start()
    producer.join()
    assert client.flush(timeout=180)
    stats = client.stats()
    client.close()

    assert len(ids) == TOTAL == len(set(ids))
    assert stored_ids(target, workload) == Counter(ids)  # each id stored once, none missing, none extra
    assert stats["dropped"] == 0 and stats["rejected"] == 0 and stats["sent"] >= TOTAL
    assert stats["replayed"] == stats["spooled"] > 0  # the outages were felt: spooled, then all replayed
