"""The client's counters, and the one place records and problems are handed to `on_error`.

Shared by the caller's thread (a full queue spools or drops there) and the sender thread, so
the counters sit behind a lock; `on_error` runs on whichever thread found the problem.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import orjson

logger = logging.getLogger("flywheel.client")

COUNTERS = ("sent", "retried", "spooled", "dropped", "rejected", "replayed")
OnError = Callable[[dict[str, Any] | None, Exception], None]


class Reporter:
    def __init__(self, on_error: OnError | None):
        self._on_error = on_error
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._lock = threading.Lock()

    def count(self, name: str, n: int) -> None:
        with self._lock:
            self._counts[name] += n

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def drop(self, items: list, error: Exception) -> None:
        if items:
            self.report("dropped", items, error)

    def report(self, counter: str, items: list, errors: Exception | list[Exception]) -> None:
        """Count and hand each record (decoded if it is a spool/queue line) to on_error."""
        self.count(counter, len(items))
        for i, item in enumerate(items):
            error = errors[i] if isinstance(errors, list) else errors
            if isinstance(item, bytes):
                try:
                    item = orjson.loads(item)
                except orjson.JSONDecodeError:
                    item = {"raw": item.decode("utf-8", "replace")}
            self.call(item, error)

    def call(self, record: dict[str, Any] | None, error: Exception) -> None:
        """on_error(record, error); record is None for a problem of the service, not of one record."""
        if self._on_error is None:
            if record is None:
                logger.warning("flywheel client: %s", error)
            else:
                logger.warning("flywheel record %s: %s", record.get("id"), error)
            return
        try:
            self._on_error(record, error)
        except Exception:  # the service's callback must not kill the sender
            logger.exception("flywheel on_error callback raised")
