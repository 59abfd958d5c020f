"""THE BAR: 20,000 records posted through FlywheelClient while the real Serve app is stopped and
restarted twice; every record arrives exactly once.

Stop is `serve.shutdown()`: the proxy goes away, open connections are cut and new ones refused.
Start is `serve.launch.deploy(settings, port=<same port>)`: the proxy comes back first and answers
404 until the app is deployed, then the app answers. The records are read back with
GET /v1/logs?workload_id=<fresh>, so the check is on what the store holds: exactly the ids
log() returned, each once. The app is up again on the same URL when the test ends, pass or fail.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import httpx
import pytest

from ray_app.client import FlywheelClient, RouteNotFound
from tests.conftest import ADMIN_KEY, chat_record

TOTAL, BLOCKS, OUTAGE_S = 20_000, 5, 1.0


class ServeApp:
    """The session's app, stopped and started in place."""

    def __init__(self, url: str, settings) -> None:
        self.url, self.settings = url, settings
        self.port = int(url.rsplit(":", 1)[1])
        self.down = False

    def stop(self) -> None:
        from ray import serve

        self.down = True
        serve.shutdown()

    def start(self) -> None:
        from serve.launch import deploy

        deploy(self.settings, port=self.port)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    self.down = False
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.url} did not come back")


@pytest.fixture
def app(app_url, settings):
    served = ServeApp(app_url, settings)
    yield served
    if served.down:  # a failure mid-test must not leave later tests without their app
        served.start()


def stored_ids(url: str, workload_id: str) -> Counter[str]:
    answer = httpx.get(f"{url}/v1/logs", params={"workload_id": workload_id, "limit": 2 * TOTAL},
                       headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)
    answer.raise_for_status()
    return Counter(record["id"] for record in answer.json()["records"])


def test_every_record_arrives_exactly_once_across_two_restarts(app, tmp_path):
    workload = f"bar-{uuid.uuid4().hex[:8]}"
    errors: list[tuple[dict | None, Exception]] = []
    client = FlywheelClient(app.url, api_key=ADMIN_KEY, spool_dir=tmp_path / "spool", spool_after=0.5,
                            max_backoff=0.5, flush_interval=0.1, on_error=lambda r, e: errors.append((r, e)))
    ids: list[str] = []
    phase = threading.Semaphore(0)  # one release per block: up, down, up, down, up

    def produce() -> None:  # a service logging steadily, about 5,000 records a second
        per_block = TOTAL // BLOCKS
        for block in range(BLOCKS):
            phase.acquire()
            for i in range(block * per_block, (block + 1) * per_block):
                ids.append(client.log(chat_record(workload, i)))
                if i % 100 == 99:
                    time.sleep(0.02)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    phase.release()  # block 0 while the app is up
    for outage in range(2):
        while len(ids) < (2 * outage + 1) * TOTAL // BLOCKS - 500 and producer.is_alive():
            time.sleep(0.01)
        app.stop()  # with the block's last records still being logged and a batch likely in flight
        phase.release()  # the next block is logged while the app is down
        time.sleep(OUTAGE_S)
        app.start()
        phase.release()  # and the one after while it is back and the spool replays
    producer.join(60)
    assert not producer.is_alive()
    assert client.flush(timeout=120)
    stats = client.stats()
    client.close()

    assert len(ids) == TOTAL == len(set(ids))
    assert stored_ids(app.url, workload) == Counter(ids)  # each id stored once, none missing, none extra
    assert stats["dropped"] == 0 and stats["rejected"] == 0 and stats["sent"] >= TOTAL
    assert stats["replayed"] == stats["spooled"] >= TOTAL // BLOCKS  # the outages were felt, then replayed
    # nothing was lost or refused: the only reports are the proxy's 404 while the app redeployed
    assert all(record is None and isinstance(error, RouteNotFound) for record, error in errors), errors
