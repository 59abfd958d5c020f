"""The two front-ends over one SenderCore: FlywheelClient for threads, AsyncFlywheelClient for asyncio.

`log()` is the same plain call in both (it never blocks, so it needs no await); only the calls
that wait (flush, close, feedback) differ, and the async ones run the core's wait in a thread.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any

from ray_app.client.core import SenderCore
from ray_app.client.reporting import OnError


class _ClientBase:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str,
        spool_dir: str | os.PathLike | None = None,
        batch_size: int = 500,
        flush_interval: float = 0.5,
        max_queue: int = 50_000,
        timeout: float = 10.0,
        on_error: OnError | None = None,
        spool_after: float = 5.0,
        max_backoff: float = 5.0,
    ):
        """
        base_url:       the Flywheel service, e.g. "http://127.0.0.1:8000"
        api_key:        sent as `Authorization: Bearer KEY`
        spool_dir:      where undeliverable records are kept (JSONL segments) and replayed from;
                        None keeps everything in memory (a full queue then drops and reports)
        batch_size:     records per POST (at most 5,000); flush_interval: seconds a record may wait
        max_queue:      records held in memory; past it, log() spools on the caller's thread
        timeout:        seconds per HTTP request
        on_error:       called as on_error(record, error) for every rejected or dropped record, as
                        on_error(None, AuthError) when the service refuses the key, and once per
                        stretch of 404s as on_error(None, RouteNotFound) (a warning: the records
                        are kept and retried); runs on the sender thread (or the caller's, for a
                        full queue)
        spool_after:    seconds of failed retries before a batch goes to the spool
        max_backoff:    cap, in seconds, on the exponential backoff between retries and probes
        """
        self._core = SenderCore(
            base_url, api_key=api_key, spool_dir=spool_dir, batch_size=batch_size,
            flush_interval=flush_interval, max_queue=max_queue, timeout=timeout, on_error=on_error,
            spool_after=spool_after, max_backoff=max_backoff,
        )

    def log(self, record: dict[str, Any]) -> str:
        """Queue one record and return its id (the record's own, or a new random one)."""
        return self._core.log(record)

    def stats(self) -> dict[str, int]:
        """Counters: sent, retried, spooled, dropped, rejected, replayed, and the queued gauge."""
        return self._core.stats()


class FlywheelClient(_ClientBase):
    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything logged (and spooled) is acknowledged: True, or False at the timeout.

        Raises AuthError if the service refused the key."""
        return self._core.flush(timeout)

    def close(self, timeout: float = 30.0) -> bool:
        """Flush for up to `timeout`, spool whatever is left, stop the sender. Idempotent."""
        return self._core.close(timeout)

    def feedback(self, record_id: str, *, rating: Any, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """Attach feedback to a logged record: POST /v1/logs/{id}/feedback -> {"id", "updated"}."""
        return self._core.feedback(record_id, rating=rating, timeout=timeout, **fields)

    def __enter__(self) -> FlywheelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncFlywheelClient(_ClientBase):
    async def flush(self, timeout: float = 30.0) -> bool:
        return await asyncio.to_thread(self._core.flush, timeout)

    async def close(self, timeout: float = 30.0) -> bool:
        return await asyncio.to_thread(self._core.close, timeout)

    async def feedback(self, record_id: str, *, rating: Any, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        return await asyncio.to_thread(self._core.feedback, record_id, rating=rating, timeout=timeout, **fields)

    async def __aenter__(self) -> AsyncFlywheelClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
