"""POST /v1/logs/{id}/feedback: sent at once (not batched), retried on transient failures.

A record logged a moment ago may still sit in this client's queue, so a first "no such record"
flushes the queue and tries again before it is believed. That answer is the service's own JSON
404; Ray Serve's proxy answers a plain-text 404 while the app is being redeployed, which is
retried like any other outage.
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
        answer = None
        try:
            answer = transport.post_json(path, payload)
            outcome = classify(answer, 1)
        except httpx.TransportError as exc:
            outcome = Outcome("transient", message=f"{type(exc).__name__}: {exc}")
        if outcome.kind == "ok":
            return answer.json()
        unknown = _no_such_record(answer) if outcome.status == 404 else None
        if unknown is not None:
            if flushed:
                raise RecordRejected(f"feedback for {record_id!r}: {unknown}", status=404)
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


def _no_such_record(answer: httpx.Response | None) -> str | None:
    """The message of the app's own JSON 404 (`{"error": ..., "message": ...}`); None for the proxy's text."""
    try:
        body = answer.json() if answer is not None else None
    except ValueError:
        return None
    return str(body.get("message") or body["error"]) if isinstance(body, dict) and "error" in body else None
