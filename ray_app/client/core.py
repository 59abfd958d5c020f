"""The sender core both front-ends share: queue, batching, retries, spool, replay, counters.

`log()` runs on the caller's thread and does almost nothing: copy the dict, give it an id if it
has none (so every retry and replay carries the same idempotency key), append to a deque. One
background thread does the rest:

    take up to batch_size records -> encode -> POST
      ok         counted as sent
      422 / 4xx  the records the service names (`records.N...`) go to on_error, the rest are resent;
                 when it names none, the batch is bisected down to the bad record
      413        bisected
      transient  retried with exponential backoff and jitter, or after Retry-After; once the service
                 has been unreachable for `spool_after` seconds the batch goes to the spool, and until
                 a probe succeeds new batches go straight there
      401/403    the sender stops posting; everything goes to the spool; flush/close raise
    then one chunk of the spool is replayed, while the service answers.

A full queue spools on the caller's thread (one write, no fsync), so memory stays bounded and
the caller never blocks on the network. Without a spool_dir, a full queue drops, counts and
reports to on_error; nothing is ever dropped silently.
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from ray_app.client.errors import (
    AuthError,
    ClientClosed,
    ClientError,
    RecordDropped,
    RecordRejected,
)
from ray_app.client.feedback import send_feedback
from ray_app.client.spool import Segment, Spool
from ray_app.client.transport import Outcome, Transport, backoff

logger = logging.getLogger("flywheel.client")

MAX_BATCH = 5_000  # the service's limit for one POST /v1/logs
COUNTERS = ("sent", "retried", "spooled", "dropped", "rejected", "replayed")
OnError = Callable[[dict[str, Any] | None, Exception], None]


class SenderCore:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str,
        spool_dir: str | os.PathLike | None,
        batch_size: int,
        flush_interval: float,
        max_queue: int,
        timeout: float,
        on_error: OnError | None,
        spool_after: float,
        max_backoff: float,
    ):
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH}, got {batch_size!r}")
        if max_queue < batch_size:
            raise ValueError(f"max_queue must be at least batch_size ({batch_size}), got {max_queue!r}")
        for name, value in (("flush_interval", flush_interval), ("timeout", timeout),
                            ("spool_after", spool_after), ("max_backoff", max_backoff)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        self._batch_size, self._max_queue, self._flush_interval = batch_size, max_queue, flush_interval
        self._spool_after, self._max_backoff, self._on_error = spool_after, max_backoff, on_error
        self._transport = Transport(base_url, api_key=api_key, timeout=timeout)
        self._spool = Spool(spool_dir) if spool_dir is not None else None
        self._spool_pending = self._spool is not None  # a previous run may have left segments
        self._segment: Segment | None = None
        self._queue: deque[dict[str, Any]] = deque()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._changed = threading.Condition()
        self._busy = False  # the sender holds records that are in neither the queue nor the spool
        self._down_until, self._probe_failures = 0.0, 0
        self._fatal: ClientError | None = None
        self._closed = False
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._count_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="flywheel-sender", daemon=True)
        self._thread.start()
        # a service that exits without close() still gets its queue delivered or spooled
        self._atexit = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._atexit)

    # ---- caller side ----

    def log(self, record: dict[str, Any]) -> str:
        if type(record) is not dict:
            raise TypeError(f"record must be a dict, got {type(record).__name__}")
        if self._closed:
            raise ClientClosed("log() after close()")
        record = dict(record)  # the caller may reuse its dict; nested values are not copied
        rid = record.get("id")
        if not rid:
            rid = record["id"] = os.urandom(16).hex()
        queue = self._queue
        if len(queue) >= self._max_queue:
            self._overflow(record)
        else:
            queue.append(record)
            if len(queue) >= self._batch_size and not self._wake.is_set():
                self._wake.set()
        return rid

    def _overflow(self, record: dict[str, Any]) -> None:
        if self._spool is None:
            self._drop([record], RecordDropped(f"queue full ({self._max_queue} records) and no spool_dir"))
            return
        try:
            line = orjson.dumps(record)
        except TypeError as exc:
            self._report("rejected", [record], RecordRejected(f"record is not JSON-serializable: {exc}"))
            return
        try:
            self._spool.append([line])
        except OSError as exc:
            self._drop([record], RecordDropped(f"queue full and spool write failed: {exc}"))
            return
        self._count("spooled", 1)
        self._spool_pending = True

    def flush(self, timeout: float = 30.0) -> bool:
        """True once the queue, the batch in flight and the spool are all acknowledged."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if self._fatal is not None:
                    raise self._fatal
                if self._quiet():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wake.set()
                self._changed.wait(min(remaining, 0.05))

    def close(self, timeout: float = 30.0) -> bool:
        """Flush for up to `timeout`, then spool (or drop and report) whatever is left, and stop."""
        if self._closed:
            return self._quiet()
        self._closed = True
        atexit.unregister(self._atexit)
        try:
            delivered = self.flush(timeout)
        except ClientError:
            delivered = False
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self._park_queue()  # a log() racing close() may have appended after the sender left
        if self._spool is not None:
            self._spool.close()
        self._transport.close()
        if self._fatal is not None:
            raise self._fatal
        return delivered

    def stats(self) -> dict[str, int]:
        with self._count_lock:
            counts = dict(self._counts)
        counts["queued"] = len(self._queue)
        return counts

    def feedback(self, record_id: str, *, rating: Any, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        return send_feedback(self._transport, record_id, {"rating": rating, **fields}, timeout=timeout,
                             flush=self.flush, backoff=functools.partial(backoff, self._max_backoff))

    # ---- sender thread ----

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._step():
                    if self._spool is not None:
                        self._spool.sync()
                    self._notify()
                    self._wake.wait(self._idle_wait())
                    self._wake.clear()
            self._park_queue()
            if self._segment is not None:
                self._spool.release(self._segment, done=False)
                self._segment = None
        except BaseException as exc:  # a bug here must surface in flush/close, not vanish with the thread
            logger.exception("flywheel sender crashed")
            self._fatal = self._fatal or ClientError(f"sender crashed: {exc!r}")
        finally:
            self._busy = False
            self._notify()

    def _step(self) -> bool:
        """One batch from the queue, then one chunk of the spool; False when there was nothing to do."""
        self._busy = True  # before popping, so flush never sees the records nowhere
        try:
            queue = self._queue
            batch = [queue.popleft() for _ in range(min(len(queue), self._batch_size))]
            if batch:
                self._deliver(self._encode(batch), from_spool=False)
            replayed = self._replay_step()
            if batch and self._spool is not None:
                self._spool.sync()  # fsync at batch boundaries
            return bool(batch) or replayed
        finally:
            self._busy = False
            self._notify()

    def _encode(self, records: list[dict[str, Any]]) -> list[bytes]:
        lines = []
        for record in records:
            try:
                lines.append(orjson.dumps(record))
            except TypeError as exc:
                self._report("rejected", [record], RecordRejected(f"record is not JSON-serializable: {exc}"))
        return lines

    def _deliver(self, lines: list[bytes], *, from_spool: bool) -> bool:
        """Post until every line is acknowledged or rejected (True); else park the rest (False)."""
        if self._fatal is not None or (self._spool is not None and time.monotonic() < self._down_until):
            return self._park(lines, from_spool)
        parts = [lines]
        while parts:
            part = parts.pop()
            outcome = self._post(part, patient=self._down_until == 0.0)
            if outcome.kind == "ok":
                self._recovered()
                self._count("sent", len(part))
            elif outcome.kind == "invalid" and outcome.bad:
                self._report("rejected", [part[i] for i in sorted(outcome.bad)],
                             [RecordRejected(msg, status=outcome.status, field=fld) for msg, fld in
                              (outcome.bad[i] for i in sorted(outcome.bad))])
                rest = [line for i, line in enumerate(part) if i not in outcome.bad]
                if rest:
                    parts.append(rest)
            elif outcome.kind in ("invalid", "too_large"):
                if len(part) == 1:
                    self._report("rejected", part, RecordRejected(outcome.message, status=outcome.status))
                else:  # the service named no record: halve until the bad one is alone
                    half = len(part) // 2
                    parts += [part[half:], part[:half]]
            else:
                if outcome.kind == "fatal":
                    self._fatal = AuthError(outcome.message, status=outcome.status)
                    logger.error("flywheel client stopped sending: %s", outcome.message)
                    self._call_on_error(None, self._fatal)
                else:
                    self._mark_down(outcome)
                return self._park([line for p in [part, *parts] for line in p], from_spool)
        return True

    def _post(self, part: list[bytes], *, patient: bool) -> Outcome:
        """One POST, retried on transient failures while patient and within spool_after."""
        first_failure, attempt = time.monotonic(), 0
        while True:
            outcome = self._transport.post_batch(part)
            if outcome.kind != "transient" or self._stop.is_set():
                return outcome
            delay = outcome.retry_after
            if delay is None:
                delay = backoff(self._max_backoff, attempt)
            give_up_at = first_failure + self._spool_after
            if self._spool is not None and (not patient or time.monotonic() + delay > give_up_at):
                return outcome
            attempt += 1
            self._count("retried", len(part))
            logger.debug("retrying %d records in %.2fs: %s", len(part), delay, outcome.message)
            if self._stop.wait(delay):
                return outcome

    def _park(self, lines: list[bytes], from_spool: bool) -> bool:
        """Keep undelivered lines: spooled ones stay in their segment; others go to the spool or are dropped."""
        if from_spool or not lines:
            return False
        if self._spool is None:
            self._drop(lines, self._fatal or RecordDropped("service unreachable at close and no spool_dir"))
            return False
        try:
            self._spool.append(lines)
        except OSError as exc:
            self._drop(lines, RecordDropped(f"spool write failed: {exc}"))
            return False
        self._count("spooled", len(lines))
        self._spool_pending = True
        return False

    def _park_queue(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._batch_size))]
            self._park(self._encode(batch), from_spool=False)
        if self._spool is not None:
            self._spool.sync()

    def _replay_step(self) -> bool:
        """Send the next chunk of the oldest spool segment while the service answers."""
        if self._spool is None or self._fatal is not None or time.monotonic() < self._down_until:
            return False
        segment = self._segment
        if segment is None:
            if not self._spool_pending:
                return False
            segment = self._spool.claim()
            # our own active segment is sealed for replay once the live queue has drained
            if segment is None and self._spool.active_bytes() and len(self._queue) < self._batch_size:
                self._spool.seal()
                segment = self._spool.claim()
            if segment is None:
                self._spool_pending = self._spool.active_bytes() > 0
                return False
            self._segment = segment
            self._drop(segment.corrupt, RecordDropped(f"torn line in spool segment {segment.path.name}"))
        chunk = segment.lines[segment.offset:segment.offset + self._batch_size]
        if chunk:
            if not self._deliver(chunk, from_spool=True):
                return False
            segment.offset += len(chunk)
            self._count("replayed", len(chunk))
        if segment.offset >= len(segment.lines):
            self._spool.release(segment, done=True)
            self._segment = None
        return True

    def _idle_wait(self) -> float:
        if self._spool_pending and self._down_until:
            return max(0.0, min(self._flush_interval, self._down_until - time.monotonic()))
        return self._flush_interval

    def _mark_down(self, outcome: Outcome) -> None:
        self._probe_failures += 1
        delay = outcome.retry_after
        if delay is None:
            delay = backoff(self._max_backoff, self._probe_failures)
        self._down_until = time.monotonic() + delay
        logger.warning("flywheel service unreachable (%s); spooling, next try in %.1fs", outcome.message, delay)

    def _recovered(self) -> None:
        if self._down_until:
            logger.info("flywheel service reachable again; replaying the spool")
        self._down_until, self._probe_failures = 0.0, 0

    def _quiet(self) -> bool:
        if not self._thread.is_alive() and self._fatal is None and not self._closed:
            self._fatal = ClientError("sender thread is gone")
        return (not self._queue and not self._busy and self._segment is None
                and (self._spool is None or not self._spool.has_pending()))

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # ---- counters and reports ----

    def _count(self, name: str, n: int) -> None:
        with self._count_lock:
            self._counts[name] += n

    def _drop(self, items: list, error: Exception) -> None:
        if items:
            self._report("dropped", items, error)

    def _report(self, counter: str, items: list, errors: Exception | list[Exception]) -> None:
        """Count and hand each record (decoded if it is a spool/queue line) to on_error."""
        self._count(counter, len(items))
        for i, item in enumerate(items):
            error = errors[i] if isinstance(errors, list) else errors
            if isinstance(item, bytes):
                try:
                    item = orjson.loads(item)
                except orjson.JSONDecodeError:
                    item = {"raw": item.decode("utf-8", "replace")}
            self._call_on_error(item, error)

    def _call_on_error(self, record: dict[str, Any] | None, error: Exception) -> None:
        if self._on_error is None:
            logger.warning("flywheel record %s: %s", (record or {}).get("id"), error)
            return
        try:
            self._on_error(record, error)
        except Exception:  # the service's callback must not kill the sender
            logger.exception("flywheel on_error callback raised")


def _close_at_exit(ref: weakref.ref) -> None:
    core = ref()
    if core is not None and not core._closed:
        try:
            core.close(timeout=2.0)
        except ClientError as exc:
            logger.error("flywheel client at exit: %s", exc)
