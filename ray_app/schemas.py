"""The log record (a superset of the NVIDIA blueprint's document), jobs and their stages.

Validation checks the OpenAI shapes strictly (types, required fields, at least one
message) but stores the record as it came, plus the normalized top-level fields: the
nested request/response keep every extra key a client sent, so the blueprint's JSONL
loads unchanged and comes back out unchanged.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from datetime import datetime
from enum import Enum
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator
from pydantic import ValidationError as PydanticValidationError

from ray_app.errors import InvalidRecord

WorkloadType = Literal["generic", "tool_calling", "constitutional_ai", "policy_governance"]
WORKLOAD_TYPES: tuple[str, ...] = WorkloadType.__args__


class _Open(BaseModel):
    """OpenAI objects carry many optional keys; keep them, check the ones we use."""

    model_config = ConfigDict(extra="allow")


class ToolFunction(_Open):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = "{}"  # a JSON string or an object: both arrive in the wild


class ToolCall(_Open):
    id: str | None = None
    type: str = "function"
    function: ToolFunction


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = None


class ChatRequest(_Open):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None


class Choice(_Open):
    index: int = 0
    message: Message
    finish_reason: str | None = None


class ChatResponse(_Open):
    choices: list[Choice] = Field(min_length=1)


class LogRecord(_Open):
    id: str | None = Field(None, min_length=1, max_length=256)
    timestamp: float | str | None = None
    workload_id: str = Field(min_length=1, max_length=256)
    client_id: str = Field(min_length=1, max_length=256)
    request: ChatRequest
    response: ChatResponse
    workload_type: WorkloadType | None = None
    service_name: str | None = None
    constitutional_hash: str | None = None
    performance_metrics: dict[str, Any] | None = None
    feedback: dict[str, Any] | None = None

    @field_validator("timestamp")
    @classmethod
    def _epoch(cls, value: float | str | None) -> float | None:
        if value is None or isinstance(value, float | int):
            return value
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError as exc:
            raise ValueError(f"timestamp must be epoch seconds or ISO-8601, got {value!r:.40}") from exc


class IngestBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    records: list[LogRecord]


_record_adapter = TypeAdapter(LogRecord)
_batch_adapter = TypeAdapter(IngestBatch)


def has_tool_call(response: dict[str, Any]) -> bool:
    message = (response.get("choices") or [{}])[0].get("message") or {}
    return bool(message.get("tool_calls"))


def record_id(raw: dict[str, Any]) -> str:
    """Content-derived id: the same interaction posted twice is stored once."""
    body = {k: raw.get(k) for k in ("workload_id", "client_id", "request", "response", "timestamp")}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def normalize(raw: dict[str, Any], *, constitutional_hash: str, now: float | None = None) -> dict[str, Any]:
    """Validate one raw record dict and return what is stored (raw, plus normalized fields)."""
    return _finish(raw, _record_adapter.validate_python(raw), constitutional_hash, now)


def parse_ingest_body(body: Any, *, constitutional_hash: str, max_records: int) -> list[dict[str, Any]]:
    """A single record or {"records": [...]}: all valid, or InvalidRecord naming every bad field.

    A batch is accepted whole or rejected whole, so nothing is ever half-written.
    """
    if not isinstance(body, dict):
        raise InvalidRecord(f"body must be a JSON object, got {type(body).__name__}", field="(body)")
    now = time.time()
    try:
        if "records" in body:
            if isinstance(body["records"], list) and len(body["records"]) > max_records:
                raise InvalidRecord(
                    f"batch of {len(body['records'])} records is over the limit of {max_records}",
                    field="records",
                )
            parsed = _batch_adapter.validate_python(body).records
            raws = body["records"]
        else:
            parsed, raws = [_record_adapter.validate_python(body)], [body]
    except PydanticValidationError as exc:
        raise invalid_from_pydantic(exc) from exc
    if not raws:
        raise InvalidRecord("records must not be empty", field="records")
    out = [_finish(raw, rec, constitutional_hash, now) for raw, rec in zip(raws, parsed, strict=True)]
    bad_hash = [i for i, r in enumerate(out) if r["constitutional_hash"] != constitutional_hash]
    if bad_hash:
        where = f"records.{bad_hash[0]}.constitutional_hash" if "records" in body else "constitutional_hash"
        raise InvalidRecord(
            f"constitutional hash {out[bad_hash[0]]['constitutional_hash']!r} does not match {constitutional_hash!r}",
            field=where,
        )
    return out


def invalid_from_pydantic(exc: PydanticValidationError) -> InvalidRecord:
    errors = [
        {"field": ".".join(str(p) for p in e["loc"]) or "(body)", "message": e["msg"]}
        for e in exc.errors(include_url=False, include_input=False)[:20]
    ]
    first = errors[0]
    return InvalidRecord(f"{first['field']}: {first['message']}", field=first["field"], details={"errors": errors})


def _finish(raw: dict[str, Any], rec: LogRecord, constitutional_hash: str, now: float | None) -> dict[str, Any]:
    out = dict(raw)
    out["id"] = rec.id or record_id(raw)  # before the default timestamp: a re-post keeps its id
    out["timestamp"] = rec.timestamp if rec.timestamp is not None else (now or time.time())
    out["workload_type"] = rec.workload_type or ("tool_calling" if has_tool_call(raw["response"]) else "generic")
    out["constitutional_hash"] = rec.constitutional_hash or constitutional_hash
    return out


def from_blueprint_line(line: dict[str, Any], *, workload_id: str, client_id: str) -> dict[str, Any]:
    """A plain `{"messages": [...], "tools": [...]}` line: the last assistant turn is the response."""
    messages = line.get("messages")
    if not isinstance(messages, list) or len(messages) < 2 or messages[-1].get("role") != "assistant":
        raise InvalidRecord("a messages-only line needs at least two messages ending in an assistant turn",
                            field="messages")
    request: dict[str, Any] = {"messages": messages[:-1]}
    if line.get("tools"):
        request["tools"] = line["tools"]
    return {"workload_id": workload_id, "client_id": client_id, "request": request,
            "response": {"choices": [{"index": 0, "message": messages[-1], "finish_reason": "stop"}]}}


# ---- jobs -----------------------------------------------------------------------------


class JobStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class Stage(BaseModel):
    name: str
    status: JobStatus = JobStatus.PENDING
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    result: dict[str, Any] = {}


class Job(BaseModel):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:16])
    workload_id: str = Field(min_length=1, max_length=256)
    client_id: str = Field(min_length=1, max_length=256)
    status: JobStatus = JobStatus.PENDING
    config: dict[str, Any] = {}
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False
    trigger: Literal["api", "cli", "auto"] = "api"
    constitutional_hash: str = ""
    stages: list[Stage] = []
    evaluations: list[dict[str, Any]] = []
    trainings: list[dict[str, Any]] = []
    error: str | None = None
    report_dir: str | None = None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workload_id: str = Field(min_length=1, max_length=256)
    client_id: str = Field(min_length=1, max_length=256)
    config: dict[str, Any] | None = None
