"""What the client tells a service through `on_error` or by raising from flush/close.

All subclass `FlywheelError`, so a service can catch the client's problems in one place.
"""
from __future__ import annotations

from ray_app.errors import FlywheelError


class ClientError(FlywheelError):
    """Base of the client's own errors."""

    reason = "client_error"


class AuthError(ClientError):
    """401/403 (or a base URL with no ingest route): the sender stops; records stay in the spool."""

    reason = "unauthorized"

    def __init__(self, message: str, *, status: int | None = None):
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
