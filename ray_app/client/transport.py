"""One POST of a batch of encoded records, and what its answer means for the sender.

The sender decides by `Outcome.kind`:
  ok         acknowledged
  invalid    the service refused some records (422 / other 4xx): `bad` maps batch index -> message,
             empty when the service named none (then the sender bisects)
  too_large  413: the sender splits the batch
  fatal      401/403 (or 405: this base URL's route takes no POST): stop sending
  transient  connect error, timeout, 5xx, 429, and 404 (Serve's proxy answers 404 while the app is
             being redeployed): retry with backoff, `retry_after` if the service said
"""
from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import httpx
import orjson

_INDEX = re.compile(r"^records\.(\d+)(?:\.|$)")


@dataclass
class Outcome:
    kind: str
    status: int | None = None
    message: str = ""
    retry_after: float | None = None
    bad: dict[int, tuple[str, str | None]] = field(default_factory=dict)  # index -> (message, field)


class Transport:
    def __init__(self, base_url: str, *, api_key: str, timeout: float):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        )

    def post_batch(self, lines: list[bytes]) -> Outcome:
        body = b'{"records":[' + b",".join(lines) + b"]}"
        try:
            answer = self._http.post("/v1/logs", content=body)
        except httpx.TransportError as exc:  # connect refused, reset, read/connect timeout
            return Outcome("transient", message=f"{type(exc).__name__}: {exc}")
        return classify(answer, len(lines))

    def post_json(self, path: str, payload: dict) -> httpx.Response:
        return self._http.post(path, content=orjson.dumps(payload))

    def close(self) -> None:
        self._http.close()


def classify(answer: httpx.Response, size: int) -> Outcome:
    status = answer.status_code
    if status < 300:
        return Outcome("ok", status)
    message = _message(answer)
    if status in (401, 403):
        return Outcome("fatal", status, f"{status} from {answer.request.url}: {message}")
    if status == 405:
        return Outcome("fatal", status, f"405: {answer.request.url} takes no POST: {message}")
    if status == 404:
        return Outcome("transient", status, f"404: no route at {answer.request.url} (yet): {message}")
    if status == 429 or status >= 500:
        return Outcome("transient", status, message, retry_after=retry_after(answer.headers.get("retry-after")))
    if status == 413:
        return Outcome("too_large", status, message)
    return Outcome("invalid", status, message, bad=_bad_indices(answer, size))


def backoff(cap: float, attempt: int) -> float:
    """Exponential with equal jitter: half the step fixed, half random, capped at `cap` seconds."""
    step = min(cap, 0.05 * 2**attempt)
    return step / 2 + random.uniform(0, step / 2)


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _message(answer: httpx.Response) -> str:
    try:
        body = answer.json()
    except ValueError:
        return answer.text[:300]
    return str(body.get("message") or body) if isinstance(body, dict) else str(body)[:300]


def _bad_indices(answer: httpx.Response, size: int) -> dict[int, tuple[str, str | None]]:
    """`records.N...` in the body's `field` and `errors[*].field` -> {N: (message, field)}."""
    try:
        body = answer.json()
    except ValueError:
        return {}
    if not isinstance(body, dict):
        return {}
    entries = [e for e in body.get("errors") or [] if isinstance(e, dict)]
    entries.append({"field": body.get("field"), "message": body.get("message")})
    bad: dict[int, tuple[str, str | None]] = {}
    for entry in entries:
        match = _INDEX.match(str(entry.get("field") or ""))
        if match and int(match.group(1)) < size:
            bad.setdefault(int(match.group(1)), (str(entry.get("message") or ""), entry.get("field")))
    return bad
