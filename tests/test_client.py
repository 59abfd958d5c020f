"""FlywheelClient / AsyncFlywheelClient against a real HTTP ingest server (the stand-in, real validation)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from ray_app.client import (
    AsyncFlywheelClient,
    AuthError,
    FlywheelClient,
    RecordRejected,
    RouteNotFound,
)
from tests.standin_ingest import IngestStandIn, free_port, make_record

KEY = "test-key"
FAST = {"spool_after": 0.2, "max_backoff": 0.2, "flush_interval": 0.05}  # outages resolve in test time


@pytest.fixture
def server():
    with IngestStandIn(api_key=KEY) as standin:
        yield standin


@pytest.fixture
def errors():
    return []


def client(url, tmp_path=None, errors=None, **kw) -> FlywheelClient:
    options = {**FAST, **kw}
    if tmp_path is not None:
        options.setdefault("spool_dir", tmp_path / "spool")
    if errors is not None:
        options["on_error"] = lambda record, error: errors.append((record, error))
    return FlywheelClient(url, api_key=KEY, **options)


def wait_for(condition, timeout: float = 10.0) -> bool:
    """Poll `condition` until it holds: the client's sender is a thread that a loaded machine
    schedules late, so a fixed sleep before looking is a guess at this machine's speed."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def spooled_ids(spool_dir: Path) -> list[str]:
    """Ids in the spool's complete lines: a writer may be halfway through the last one (the tests
    poll while a child process spools), and the client's own replay skips a torn line too."""
    return [orjson.loads(line)["id"] for seg in sorted(spool_dir.glob("*.jsonl"))
            for line in seg.read_bytes().split(b"\n")[:-1] if line]


def test_batches_by_size_and_assigns_ids(server, tmp_path):
    c = client(server.url, tmp_path, batch_size=100, flush_interval=5.0)
    ids = [c.log(make_record(i)) for i in range(1000)]
    assert c.flush(10)
    c.close()
    assert len(set(ids)) == 1000 and all(len(i) == 32 and i.isalpha() for i in ids)  # no digits: no "card"
    assert set(server.store) == set(ids)
    sizes = [n for _, status, n in server.batches if status == 200]
    assert sum(sizes) == 1000 and max(sizes) <= 100 and len(sizes) >= 10
    assert c.stats()["sent"] == 1000


def test_time_bound_sends_a_partial_batch(server, tmp_path):
    c = client(server.url, tmp_path, batch_size=500, flush_interval=0.1)
    c.log(make_record(1, id="lonely"))
    deadline = time.monotonic() + 5
    while "lonely" not in server.store and time.monotonic() < deadline:
        time.sleep(0.02)  # nobody calls flush: the flush_interval alone must send it
    assert "lonely" in server.store
    c.close()


def test_keeps_the_callers_id_and_does_not_mutate_its_dict(server, tmp_path):
    mine, anonymous = make_record(1, id="given-id"), make_record(2)
    c = client(server.url, tmp_path)
    assert c.log(mine) == "given-id"
    generated = c.log(anonymous)
    assert c.flush(5)
    c.close()
    assert "id" not in anonymous and set(server.store) == {"given-id", generated}


def test_retry_after_a_lost_answer_is_idempotent(server, tmp_path):
    server.lose_answers = 2  # stored, but the connection is cut before the answer
    c = client(server.url, tmp_path, batch_size=50)
    ids = [c.log(make_record(i)) for i in range(200)]
    assert c.flush(10)
    c.close()
    assert set(server.store) == set(ids)
    # the first batch was stored three times over (two answers lost): same ids each time, stored once
    first_batch = server.batches[0][2]
    assert sorted(server.posts.values(), reverse=True)[:first_batch + 1] == [3] * first_batch + [1]
    assert c.stats()["retried"] == 2 * first_batch and c.stats()["sent"] == 200


@pytest.mark.parametrize("status", [503, 429])
def test_retry_after_header_is_honoured(server, tmp_path, status):
    server.fail_next(1, status=status, retry_after=1)
    c = client(server.url, tmp_path, spool_after=5.0)  # backoff alone would retry after ~50 ms
    ids = [c.log(make_record(i)) for i in range(10)]
    assert c.flush(10)
    c.close()
    first, second = server.post_times()[:2]
    assert second - first >= 0.95  # a lower bound: a loaded machine only waits longer (50 ms: timers' rounding)
    assert set(server.store) == set(ids) and c.stats()["retried"] == 10


def test_spools_while_down_and_replays_on_next_start(tmp_path):
    server = IngestStandIn(api_key=KEY, port=free_port())  # not started: connection refused
    first = client(server.url, tmp_path)
    ids = [first.log(make_record(i)) for i in range(1000)]
    assert not first.flush(1.0)
    assert not first.close(timeout=0.2)
    assert first.stats()["spooled"] == 1000 and first.stats()["sent"] == 0
    assert sorted(spooled_ids(tmp_path / "spool")) == sorted(ids)
    with server.start():
        second = client(server.url, tmp_path)
        assert second.flush(10)
        second.close()
    assert set(server.store) == set(ids) and second.stats()["replayed"] == 1000
    assert not list((tmp_path / "spool").glob("*.jsonl"))


def test_replays_while_running_once_the_server_is_back(tmp_path):
    server = IngestStandIn(api_key=KEY, port=free_port())
    c = client(server.url, tmp_path)
    ids = [c.log(make_record(i)) for i in range(300)]
    assert wait_for(lambda: c.stats()["spooled"] == 300)  # refused for spool_after (0.2 s), then spooled
    with server.start():
        assert c.flush(10)
        c.close()
    assert set(server.store) == set(ids)


def test_full_queue_spools_instead_of_blocking(server, tmp_path):
    server.delay = 0.3  # a slow service: the sender is busy, the queue fills
    c = client(server.url, tmp_path, batch_size=100, max_queue=200)
    started = time.perf_counter()
    ids = [c.log(make_record(i)) for i in range(3000)]
    # Waiting for room in the queue would mean waiting for the 27 POSTs that free it, 0.3 s each:
    # 8.1 s on any machine. Spooling instead takes ~30 ms here; half the waiting time tells them apart.
    waiting = (3000 - 200 - 100) / 100 * server.delay
    assert time.perf_counter() - started < waiting / 2
    assert c.stats()["spooled"] >= 2000 and c.stats()["queued"] <= 200
    server.delay = 0
    assert c.flush(20)
    c.close()
    assert set(server.store) == set(ids) and c.stats()["dropped"] == 0


def test_full_queue_without_spool_drops_and_reports(server, errors):
    server.delay = 0.3
    c = client(server.url, None, errors, batch_size=100, max_queue=100)
    ids = [c.log(make_record(i)) for i in range(500)]
    server.delay = 0
    assert c.flush(10)
    c.close()
    dropped = {record["id"] for record, _ in errors}
    assert c.stats()["dropped"] == len(dropped) > 0
    assert dropped | set(server.store) == set(ids) and not dropped & set(server.store)


def test_unauthorized_stops_and_keeps_records_in_the_spool(server, tmp_path, errors):
    server.refuse_keys = True
    c = client(server.url, tmp_path, errors)
    ids = [c.log(make_record(i)) for i in range(50)]
    with pytest.raises(AuthError, match="401"):
        c.flush(5)
    ids += [c.log(make_record(i)) for i in range(50, 60)]  # still accepted, straight to the spool
    with pytest.raises(AuthError):
        c.close()
    assert [type(e) for r, e in errors] == [AuthError] and errors[0][0] is None
    assert sorted(spooled_ids(tmp_path / "spool")) == sorted(ids) and not server.store
    server.refuse_keys = False
    again = client(server.url, tmp_path)
    assert again.flush(10)
    again.close()
    assert set(server.store) == set(ids)


def test_404_while_serve_redeploys_is_retried_and_reported_once(server, tmp_path, errors):
    server.missing_routes = 3  # the proxy is up, the app not yet: plain-text 404s
    c = client(server.url, tmp_path, errors, spool_after=5.0)
    ids = [c.log(make_record(i)) for i in range(100)]
    assert c.flush(10)
    c.close()
    assert set(server.store) == set(ids)
    assert [(record, type(e)) for record, e in errors] == [(None, RouteNotFound)]
    assert isinstance(errors[0][1], Warning) and errors[0][1].status == 404 and "not found" in str(errors[0][1])
    stats = c.stats()
    assert stats["retried"] >= 3 and stats["spooled"] == stats["rejected"] == stats["dropped"] == 0


def test_a_long_404_spools_then_replays_one_report_per_stretch(server, tmp_path, errors):
    server.missing_routes = 10**9
    c = client(server.url, tmp_path, errors)
    ids = [c.log(make_record(i)) for i in range(300)]
    assert not c.flush(1.0)  # a second of probes, all 404
    assert wait_for(lambda: c.stats()["spooled"] == 300)  # the sender spools after spool_after (0.2 s)
    assert not server.store and len(errors) == 1
    server.missing_routes = 0
    assert c.flush(10)
    server.missing_routes = 2  # a second redeploy: reported again
    ids += [c.log(make_record(i)) for i in range(300, 310)]
    assert c.flush(10)
    c.close()
    assert set(server.store) == set(ids)
    assert [type(e) for _, e in errors] == [RouteNotFound, RouteNotFound]


def test_405_stays_fatal(server, tmp_path, errors):
    server.fail_next(1, status=405)
    c = client(server.url, tmp_path, errors)
    c.log(make_record(1))
    with pytest.raises(AuthError, match="405"):
        c.flush(5)
    with pytest.raises(AuthError):
        c.close()
    assert [type(e) for _, e in errors] == [AuthError] and len(spooled_ids(tmp_path / "spool")) == 1


def test_invalid_records_are_isolated_reported_and_the_rest_sent(server, tmp_path, errors):
    records = [make_record(i) for i in range(20)]
    records[2]["request"]["messages"] = []
    records[7]["workload_id"] = ""
    records[15]["response"] = {"choices": "nope"}
    c = client(server.url, tmp_path, errors, batch_size=20, flush_interval=5.0)  # one batch of 20
    ids = [c.log(r) for r in records]
    assert c.flush(10)
    c.close()
    bad = {ids[2], ids[7], ids[15]}
    assert {record["id"] for record, _ in errors} == bad
    assert all(isinstance(e, RecordRejected) and e.status == 422 for _, e in errors)
    assert {e.field.split(".", 2)[1] for _, e in errors} == {"2", "7", "15"}
    assert set(server.store) == set(ids) - bad
    assert c.stats()["rejected"] == 3 and c.stats()["sent"] == 17
    assert len(server.batches) == 2  # one 422 naming all three, one clean resend


def test_a_422_that_names_no_record_is_bisected(tmp_path, errors):
    with IngestStandIn(api_key=KEY, max_records=8) as small:  # answers 422 field="records" above 8
        c = client(small.url, tmp_path, errors, batch_size=20)
        ids = [c.log(make_record(i)) for i in range(20)]
        assert c.flush(10)
        c.close()
    assert set(small.store) == set(ids) and not errors
    assert max(n for _, status, n in small.batches if status == 200) <= 8


def test_async_client(server, tmp_path):
    async def main():
        async with AsyncFlywheelClient(server.url, api_key=KEY, spool_dir=tmp_path, **FAST) as c:
            ids = [c.log(make_record(i)) for i in range(1000)]
            assert await c.flush(10)
            answer = await c.feedback(ids[0], rating=4, comment="ok")
            return ids, answer, c.stats()

    ids, answer, stats = asyncio.run(main())
    assert set(server.store) == set(ids) and stats["sent"] == 1000
    assert answer == {"id": ids[0], "updated": True}
    assert server.store[ids[0]]["feedback"] == {"rating": 4, "comment": "ok"}


def test_feedback_waits_for_a_record_still_queued(server, tmp_path):
    c = client(server.url, tmp_path, flush_interval=5.0)
    rid = c.log(make_record(1))
    assert c.feedback(rid, rating=1) == {"id": rid, "updated": True}  # 404 first: flushes, then succeeds
    assert server.store[rid]["feedback"] == {"rating": 1}
    with pytest.raises(RecordRejected, match="no record"):
        c.feedback("never-logged", rating=5)
    server.missing_routes = 2  # the proxy's text 404 is an outage, not an unknown record
    assert c.feedback(rid, rating=2) == {"id": rid, "updated": True}
    assert server.store[rid]["feedback"] == {"rating": 2}
    c.close()


def test_bad_arguments_name_the_value(server):
    with pytest.raises(ValueError, match=r"batch_size .* 6000"):
        FlywheelClient(server.url, api_key=KEY, batch_size=6000)
    c = FlywheelClient(server.url, api_key=KEY)
    with pytest.raises(TypeError, match="list"):
        c.log([1, 2])
    c.close()
