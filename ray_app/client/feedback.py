"""POST /v1/logs/{id}/feedback: sent at once (not batched), retried on transient failures.

A record logged a moment ago may still sit in this client's queue, so a first 404 flushes the
queue and tries again before it is believed.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx

from ray_app.client.errors import AuthError, ClientError, RecordRejected
from ray_app.client.transport import Outcome, Transport, classify


def send_feedback(transport: Transport, record_id: str, payload: dict[str, Any], *, timeout: float,
                  flush: Callable[[float], bool], backoff: Callable[[int], float]) -> dict[str, Any]:
    path = f"/v1/logs/{quote(record_id, safe='')}/feedback"
    deadline, flushed, attempt = time.monotonic() + timeout, False, 0
    while True:
        try:
            answer = transport.post_json(path, payload)
            outcome = classify(answer, 1)
        except httpx.TransportError as exc:
            outcome = Outcome("transient", message=f"{type(exc).__name__}: {exc}")
        if outcome.kind == "ok":
            return answer.json()
        if outcome.status == 404 and not flushed:
            flushed = True
            flush(max(0.0, deadline - time.monotonic()))
            continue
        if outcome.status in (401, 403):
            raise AuthError(outcome.message, status=outcome.status)
        if outcome.kind != "transient":
            raise RecordRejected(f"feedback for {record_id!r}: {outcome.message}", status=outcome.status)
        delay = outcome.retry_after if outcome.retry_after is not None else backoff(attempt)
        attempt += 1
        if time.monotonic() + delay > deadline:
            raise ClientError(f"feedback for {record_id!r} not delivered in {timeout}s: {outcome.message}")
        time.sleep(delay)
