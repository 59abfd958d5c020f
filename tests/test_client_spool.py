"""The client's spool: what reaches the disk survives a crash, and nothing on it is taken from its writer.

The kill tests run a real client in a child process and SIGKILL it; the race test opens a
replayer's window by hand, because on a loaded machine it opens by itself about once in 15 runs.
"""
from __future__ import annotations

import fcntl
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest

from ray_app.client.spool import Spool
from tests.standin_ingest import IngestStandIn, free_port, make_record
from tests.test_client import KEY, client, spooled_ids


@pytest.fixture
def server():
    with IngestStandIn(api_key=KEY) as standin:
        yield standin


def test_a_segment_being_opened_is_never_claimed(tmp_path, monkeypatch):
    """A replayer (this process's sender, or another client on the directory) that lists the spool
    between the writer creating a segment and locking it must not see it: it would find it
    empty, call it delivered and delete it, and the writer would append to a deleted file."""
    writer, replayer = Spool(tmp_path), Spool(tmp_path)
    seen_in_the_window = []
    flock = fcntl.flock

    def writer_locks_after_a_look(fd, operation):
        if operation == fcntl.LOCK_EX and not seen_in_the_window:  # the writer's blocking lock
            segment = replayer.claim()
            if segment is not None:  # what the sender does with a segment that has no lines left
                replayer.release(segment, done=True)
            seen_in_the_window.append(segment)
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", writer_locks_after_a_look)
    writer.append([b'{"id": "a"}', b'{"id": "b"}'])
    monkeypatch.undo()
    assert seen_in_the_window == [None]
    assert replayer.claim() is None  # open and locked: still its writer's
    writer.seal()
    segment = replayer.claim()
    assert segment.lines == [b'{"id": "a"}', b'{"id": "b"}']
    assert [p.name for p in tmp_path.iterdir()] == [segment.path.name]  # nothing else left behind


def test_torn_spool_line_is_reported_and_the_rest_replayed(server, tmp_path):
    errors = []
    spool = tmp_path / "spool"
    spool.mkdir()
    good = [make_record(i, id=f"torn-{i}") for i in range(3)]
    (spool / "00000000000000000001-dead-000001.jsonl").write_bytes(
        b"\n".join(orjson.dumps(r) for r in good) + b'\n{"id": "half-writ')
    c = client(server.url, tmp_path, errors)
    assert c.flush(10)
    c.close()
    assert set(server.store) == {"torn-0", "torn-1", "torn-2"}
    assert c.stats()["dropped"] == 1 and errors[0][0] == {"raw": '{"id": "half-writ'}


_CHILD = textwrap.dedent("""
    import sys, time
    from ray_app.client import FlywheelClient
    url, spool, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sys.path.insert(0, sys.argv[4])
    from tests.standin_ingest import make_record
    c = FlywheelClient(url, api_key="test-key", spool_dir=spool, batch_size=200, max_queue=400,
                       spool_after=0.2, max_backoff=0.2)
    for i in range(n):
        c.log(make_record(i, id=f"kill-{i}"))
    print("logged", flush=True)
    time.sleep(60)
""")


def _run_child_and_kill(url: str, spool: Path, n: int, ready) -> None:
    root = str(Path(__file__).resolve().parents[1])
    stderr = spool.parent / "child.stderr"
    with stderr.open("w") as err:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, url, str(spool), str(n), root],
                                 stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert child.stdout.readline().strip() == "logged", stderr.read_text()
        deadline = time.monotonic() + 60  # generous: CI machines stall
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready(), f"child alive: {child.poll() is None}; its stderr: {stderr.read_text()!r}"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)


def test_killed_while_down_loses_nothing_spooled(tmp_path):
    server, spool, n = IngestStandIn(api_key=KEY, port=free_port()), tmp_path / "spool", 3000
    _run_child_and_kill(server.url, spool, n, lambda: len(spooled_ids(spool)) == n)
    with server.start():
        c = client(server.url, tmp_path)
        assert c.flush(15)
        c.close()
    assert set(server.store) == {f"kill-{i}" for i in range(n)}
    assert c.stats()["replayed"] == n and not list(spool.glob("*.jsonl"))


def test_killed_mid_batch_loses_nothing_spooled(server, tmp_path):
    server.delay = 0.5  # a batch is in flight when the child dies
    spool, n = tmp_path / "spool", 3000

    seen = []  # the states passed through, shown if the moment never comes

    def in_flight_with_records_spooled() -> bool:
        state = (server.held, len(server.batches), len(spooled_ids(spool)))
        if not seen or seen[-1] != state:
            seen.append(state)
            print("held, answered, spooled:", state)
        return state[0] >= 1 and state[2] > 0

    _run_child_and_kill(server.url, spool, n, in_flight_with_records_spooled)
    on_disk, acked = set(spooled_ids(spool)), set(server.store)
    assert len(on_disk | acked) >= n - 400 - 200  # only the in-memory queue and the batch in flight may go
    server.delay = 0
    c = client(server.url, tmp_path)
    assert c.flush(15)
    c.close()
    assert on_disk <= set(server.store)
