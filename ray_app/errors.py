"""Domain errors. One base class; the Serve ingress alone maps them to HTTP codes.

Each error carries a machine-readable `reason` and, where a field is to blame, its
dotted `field` path, so a 4xx body can say exactly what is wrong.
"""
from __future__ import annotations


class FlywheelError(Exception):
    """Base of every error Flywheel raises on purpose."""

    reason = "error"

    def __init__(self, message: str, *, field: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details or {}

    def to_dict(self) -> dict:
        body: dict = {"error": self.reason, "message": self.message}
        if self.field:
            body["field"] = self.field
        if self.details:
            body.update(self.details)
        return body


class ConfigError(FlywheelError):
    reason = "invalid_config"


class InvalidRecord(FlywheelError):
    """Input that fails the schema: wrong types, missing fields, empty messages."""

    reason = "invalid_input"


class MalformedJSON(InvalidRecord):
    reason = "invalid_json"


class PayloadTooLarge(FlywheelError):
    reason = "payload_too_large"


class NotFound(FlywheelError):
    reason = "not_found"


class Conflict(FlywheelError):
    """The request clashes with current state: a finished job cancelled, a stage claimed twice."""

    reason = "conflict"


class Unauthorized(FlywheelError):
    reason = "unauthorized"


class Forbidden(FlywheelError):
    reason = "forbidden"


class PolicyDenied(FlywheelError):
    """A Rego policy said no; `details` holds the decision."""

    reason = "policy_denied"


class StoreUnavailable(FlywheelError):
    """A backing store cannot be reached; callers may retry after `retry_after` seconds."""

    reason = "store_unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class UpstreamFailed(FlywheelError):
    """The production model behind the gateway failed or cannot be reached; the message names it."""

    reason = "upstream_failed"


class UpstreamTimeout(UpstreamFailed):
    reason = "upstream_timeout"


class JobFailed(FlywheelError):
    """A flywheel job cannot go on; the message is the one-line reason stored with the job."""

    reason = "job_failed"


class JobCancelled(FlywheelError):
    reason = "job_cancelled"


class RecordsRejected(InvalidRecord):
    """The store refused some records of a batch and kept the rest.

    `accepted` counts the new records that were stored; `rejected` lists {"id", "reason"}
    for each refused one, so a caller can report or resend exactly those.
    """

    reason = "records_rejected"

    def __init__(self, message: str, *, accepted: int, rejected: list[dict], **kw):
        super().__init__(message, details={"accepted": accepted, "rejected": rejected}, **kw)
        self.accepted = accepted
        self.rejected = rejected
