"""What the client tells a service through `on_error` or by raising from flush/close.

All subclass `FlywheelError`, so a service can catch the client's problems in one place.
"""
from __future__ import annotations

from ray_app.errors import FlywheelError


class ClientError(FlywheelError):
    """Base of the client's own errors."""

    reason = "client_error"


class AuthError(ClientError):
    """401/403 (or 405: this base URL takes no POST /v1/logs): the sender stops; records stay in the spool."""

    reason = "unauthorized"

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class RouteNotFound(ClientError, UserWarning):
    """404 where the ingest route should be: a warning, not a loss.

    Ray Serve's proxy answers 404 while an app is being (re)deployed, so the sender keeps the
    records and retries (then spools) as for any outage. Passed once per stretch of 404s to
    on_error(None, error); if it never clears, the base URL is probably wrong. It is a
    `Warning` too, so a handler can tell it from the errors that cost records.
    """

    reason = "not_found"

    def __init__(self, message: str, *, status: int | None = 404):
        super().__init__(message)
        self.status = status


class RecordRejected(ClientError):
    """The service refused this record (422, 413 for one record, other 4xx); it is not retried."""

    reason = "invalid_input"

    def __init__(self, message: str, *, status: int | None = None, field: str | None = None):
        super().__init__(message, field=field)
        self.status = status


class RecordDropped(ClientError):
    """The record could be neither sent nor spooled (full queue without a spool, spool write failed)."""

    reason = "dropped"


class ClientClosed(ClientError):
    reason = "closed"
