"""Gateway calls into the log store, after the caller has its answer, through the same door as /v1/logs.

Each answered call becomes its own record (a fresh id: two calls with the same messages are two
interactions), scrubbed and hash-stamped by the replica's `Ingest` on the replica's one ingest
thread (one batch at a time, as /v1/logs bodies are), then written by a writer thread of its own.
The caller never waits for any of it. A store that is down (StoreUnavailable, the 503 of /v1/logs)
is retried after its `retry_after`, with the records kept in order meanwhile: nothing answered is
dropped while the replica lives; `pending` says how many wait.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from ray_app.errors import StoreUnavailable
from ray_app.ingest import Ingest, IngestResult
from ray_app.storage.base import LogStore

log = logging.getLogger("flywheel.gateway")
MAX_BATCH = 256  # records written in one put_many when calls arrive faster than the store takes them


class CallLog:
    def __init__(self, ingest: Ingest, store: LogStore, scrub_on: Executor, *,
                 on_stored: Callable[[list[dict[str, Any]], int, dict[str, int]], None] | None = None):
        self.ingest, self.store, self.scrub_on, self.on_stored = ingest, store, scrub_on, on_stored
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stored = 0
        self.retries = 0
        self._busy = 0
        self._thread = threading.Thread(target=self._run, name="gateway-log", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._queue.qsize() + self._busy

    def put(self, raw: dict[str, Any]) -> None:
        """Queue one call's record (raw: not yet scrubbed)."""
        self._queue.put(raw)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued is stored (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.pending

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            self._busy = 1
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._busy = len(batch)
            try:
                door = self.scrub_on.submit(self._scrub, batch).result()
                self._write(door.records, dict(door.pii_counts))
            except Exception:
                log.exception("gateway: %d call(s) could not be logged", len(batch))
            self._busy = 0

    def _scrub(self, batch: list[dict[str, Any]]) -> IngestResult:
        ids = [raw.get("id") for raw in batch]  # before the door maps them
        door = self.ingest.records(batch)
        for i, exc in door.rejected:  # an upstream answer the log schema cannot hold: say so, keep the rest
            log.error("gateway: call %s not logged: %s", ids[i], exc.message)
        return door

    def _write(self, records: list[dict[str, Any]], pii: dict[str, int]) -> None:
        while records:
            try:
                new = self.store.put_many(records)
            except StoreUnavailable as exc:
                self.retries += 1
                log.warning("gateway: log store unavailable (%s); retrying in %.1fs", exc.message, exc.retry_after)
                time.sleep(max(0.05, exc.retry_after))
                continue
            self.stored += len(records)
            if self.on_stored is not None:
                self.on_stored(records, new, pii)
            return
