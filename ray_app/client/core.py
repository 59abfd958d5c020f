"""The sender core both front-ends share: the queue, the sender thread, and waiting on them.

`log()` runs on the caller's thread and does almost nothing: copy the dict, give it an id if it
has none (so every retry and replay carries the same idempotency key), append to a deque. One
background thread does the rest, a step at a time: take up to batch_size records, encode them,
hand them to `Delivery` (delivery.py: post, retry, bisect, spool, replay), then let it replay one
chunk of the spool. `flush()` waits until the queue, the batch in flight and the spool are empty.

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
from typing import Any

import orjson

from ray_app.client.delivery import Delivery
from ray_app.client.errors import ClientClosed, ClientError, RecordDropped, RecordRejected
from ray_app.client.feedback import send_feedback
from ray_app.client.reporting import OnError, Reporter
from ray_app.client.spool import Spool
from ray_app.client.transport import Transport, backoff

logger = logging.getLogger("flywheel.client")

MAX_BATCH = 5_000  # the service's limit for one POST /v1/logs
# hex digits -> letters a-p, in order: the service scrubs PII from every string of a record, its id
# included, and 16 digits in a row inside a hex id can pass for a card number (about 1 id in 500)
_LETTERS = str.maketrans("0123456789abcdef", "abcdefghijklmnop")


def new_record_id() -> str:
    """32 letters a-p: 48 bits of milliseconds, then 80 random bits (a UUIDv7's layout).

    No digit, so nothing at the door can take it for PII; time first, so the ids a service sends
    sort by time and the store's id index grows at its end instead of at random pages.
    """
    return (f"{time.time_ns() // 1_000_000 % 2**48:012x}" + os.urandom(10).hex()).translate(_LETTERS)


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
        self._max_backoff = max_backoff
        self._reporter = Reporter(on_error)
        self._transport = Transport(base_url, api_key=api_key, timeout=timeout)
        self._spool = Spool(spool_dir) if spool_dir is not None else None
        self._queue: deque[dict[str, Any]] = deque()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._delivery = Delivery(self._transport, self._spool, self._reporter, batch_size=batch_size,
                                  spool_after=spool_after, max_backoff=max_backoff, stop=self._stop)
        self._changed = threading.Condition()
        self._busy = False  # the sender holds records that are in neither the queue nor the spool
        self._closed = False
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
            rid = record["id"] = new_record_id()
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
            self._reporter.drop([record], RecordDropped(f"queue full ({self._max_queue} records) and no spool_dir"))
            return
        lines = self._encode([record])
        if lines:
            self._delivery.park(lines, from_spool=False)

    def flush(self, timeout: float = 30.0) -> bool:
        """True once the queue, the batch in flight and the spool are all acknowledged."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if self._delivery.fatal is not None:
                    raise self._delivery.fatal
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
        if self._delivery.fatal is not None:
            raise self._delivery.fatal
        return delivered

    def stats(self) -> dict[str, int]:
        counts = self._reporter.counts()
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
                    self._wake.wait(self._delivery.idle_wait(self._flush_interval))
                    self._wake.clear()
            self._park_queue()
            self._delivery.release_segment()
        except BaseException as exc:  # a bug here must surface in flush/close, not vanish with the thread
            logger.exception("flywheel sender crashed")
            self._delivery.fatal = self._delivery.fatal or ClientError(f"sender crashed: {exc!r}")
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
                self._delivery.deliver(self._encode(batch), from_spool=False)
            replayed = self._delivery.replay_step(queue_short=len(queue) < self._batch_size)
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
                self._reporter.report("rejected", [record],
                                      RecordRejected(f"record is not JSON-serializable: {exc}"))
        return lines

    def _park_queue(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._batch_size))]
            self._delivery.park(self._encode(batch), from_spool=False)
        if self._spool is not None:
            self._spool.sync()

    def _quiet(self) -> bool:
        if not self._thread.is_alive() and self._delivery.fatal is None and not self._closed:
            self._delivery.fatal = ClientError("sender thread is gone")
        return not self._queue and not self._busy and self._delivery.settled()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()


def _close_at_exit(ref: weakref.ref) -> None:
    core = ref()
    if core is not None and not core._closed:
        try:
            core.close(timeout=2.0)
        except ClientError as exc:
            logger.error("flywheel client at exit: %s", exc)
