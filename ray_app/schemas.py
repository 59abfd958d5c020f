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
from collections.abc import Callable
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal, Required

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic import ValidationError as PydanticValidationError
from typing_extensions import TypedDict

from ray_app.errors import InvalidRecord

WorkloadType = Literal["generic", "tool_calling", "constitutional_ai", "policy_governance"]
WORKLOAD_TYPES: tuple[str, ...] = WorkloadType.__args__


# The record schema is TypedDicts rather than BaseModels: pydantic-core validates them
# into plain dicts about 13x faster (3 ms vs 44 ms per 1,000 tool-calling records), and
# ingest throughput is bounded by this step. Extra keys are allowed and ignored here;
# the record is stored as it came.


class ToolFunction(TypedDict, total=False):
    name: Required[Annotated[str, Field(min_length=1)]]
    arguments: str | dict[str, Any]  # a JSON string or an object: both arrive in the wild


class ToolCall(TypedDict, total=False):
    id: str | None
    type: str
    function: Required[ToolFunction]


class Message(TypedDict, total=False):
    role: Required[Literal["system", "developer", "user", "assistant", "tool", "function"]]
    content: str | list[Any] | None
    tool_calls: list[ToolCall] | None


class ChatRequest(TypedDict, total=False):
    model: str | None
    messages: Required[Annotated[list[Message], Field(min_length=1)]]
    tools: list[Any] | None


class Choice(TypedDict, total=False):
    index: int
    message: Required[Message]
    finish_reason: str | None


class ChatResponse(TypedDict, total=False):
    choices: Required[Annotated[list[Choice], Field(min_length=1)]]


Name = Annotated[str, Field(min_length=1, max_length=256)]


class LogRecord(TypedDict, total=False):
    id: Name | None
    timestamp: float | str | None
    workload_id: Required[Name]
    client_id: Required[Name]
    request: Required[ChatRequest]
    response: Required[ChatResponse]
    workload_type: WorkloadType | None
    service_name: str | None
    constitutional_hash: str | None
    performance_metrics: dict[str, Any] | None
    feedback: dict[str, Any] | None
    served_by: str | None  # gateway calls: "upstream" or the registered model that answered
    route: dict[str, Any] | None  # gateway calls: the route's mode and model when the call came
    shadow: dict[str, Any] | None  # gateway calls: the other side's answer to the same request


class IngestBatch(TypedDict):
    records: list[LogRecord]


class ChatCompletionCreate(ChatRequest, total=False):
    """POST /v1/chat/completions: OpenAI's fields the gateway reads (the others travel to the upstream as sent)."""
    stream: bool
    user: str
    metadata: dict[str, str]
    max_tokens: Annotated[int, Field(ge=1)] | None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None
    tool_choice: str | dict[str, Any] | None


class ValidateContent(TypedDict, total=False):
    """POST /v1/validate's short form (the other is a whole log record)."""
    content: Required[str]
    context: dict[str, Any] | None


_record_adapter = TypeAdapter(LogRecord)
_chat_adapter = TypeAdapter(ChatCompletionCreate)
_batch_adapter = TypeAdapter(IngestBatch)


def has_tool_call(response: dict[str, Any]) -> bool:
    message = (response.get("choices") or [{}])[0].get("message") or {}
    return bool(message.get("tool_calls"))


def tools_digest(tools: list) -> str:
    """What stands for a request's tool list in its record's id: the list's own SHA-256 (sorted keys).
    A service sends one list with every record: hashed once (ray_app/tool_lists.py), not per record."""
    return "\x00sha256:" + hashlib.sha256(orjson.dumps(tools, option=orjson.OPT_SORT_KEYS)).hexdigest()


def record_id(raw: dict[str, Any], *, known_tools: tuple[list, str] | None = None) -> str:
    """Content-derived id: the same interaction posted twice is stored once.

    32 hex digits: the record's own timestamp in seconds (10 digits; zeros when it has none), then 88
    bits of the content's SHA-256. Time first, so ids of live traffic sort by time and the store's
    id index grows at its end: with ids in random order every insert lands on a random page of the
    index, and the embedded store's insert rate fell by more than half from an empty table to 140k records.
    `known_tools`: (a tool list, its `tools_digest`) computed before; used when the request holds that list.
    """
    body = {k: raw.get(k) for k in ("workload_id", "client_id", "request", "response", "timestamp")}
    request = body["request"]
    tools = request.get("tools") if isinstance(request, dict) else None
    if isinstance(tools, list):
        digest = known_tools[1] if known_tools is not None and known_tools[0] is tools else tools_digest(tools)
        body["request"] = {**request, "tools": digest}
    return _time_prefix(body["timestamp"]) + hashlib.sha256(
        orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:22]


def _time_prefix(timestamp: Any) -> str:
    """10 hex digits of whole epoch seconds, read as `_epoch` reads them; zeros when absent or
    unreadable (validation names it)."""
    if type(timestamp) in (int, float) and 0 <= timestamp < 2**40:  # epoch seconds, as most services send
        return f"{int(timestamp):010x}"
    if isinstance(timestamp, bool):
        return "0" * 10
    try:
        return f"{min(max(int(_epoch(timestamp, 'timestamp', 0.0)), 0), 2**40 - 1):010x}"
    except (InvalidRecord, AttributeError, ValueError, OverflowError):
        return "0" * 10


Scrub = Callable[[dict[str, Any]], dict[str, Any]]


def check_record(raw: Any) -> None:
    """Raise InvalidRecord (naming the field) unless `raw` has the log record's shape."""
    try:
        _record_adapter.validate_python(raw)
    except PydanticValidationError as exc:
        raise invalid_from_pydantic(exc) from exc


def check_chat_request(body: Any) -> dict[str, Any]:
    """`body` if it is a chat completion request OpenAI would take; else InvalidRecord naming the field."""
    if not isinstance(body, dict):
        raise InvalidRecord(f"body must be a JSON object, got {type(body).__name__}", field="(body)")
    try:
        _chat_adapter.validate_python(body, strict=True)
    except PydanticValidationError as exc:
        raise invalid_from_pydantic(exc) from exc
    return body


def normalize(raw: dict[str, Any], *, constitutional_hash: str, now: float | None = None,
              scrub: Scrub | None = None) -> dict[str, Any]:
    """Validate one raw record dict and return what is stored (raw, plus normalized fields)."""
    check_record(raw)
    return _finish(scrub(raw) if scrub else raw, "", constitutional_hash, now or time.time())


def parse_ingest_body(body: Any, *, constitutional_hash: str, max_records: int,
                      scrub: Scrub | None = None) -> list[dict[str, Any]]:
    """A single record or {"records": [...]}: all valid, or InvalidRecord naming every bad field.

    A batch is accepted whole or rejected whole, so nothing is ever half-written. `scrub`
    runs before the id is derived, so no id is a hash of raw personal data.
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
            _batch_adapter.validate_python(body)
            raws, prefix = body["records"], "records."
        else:
            _record_adapter.validate_python(body)
            raws, prefix = [body], ""
    except PydanticValidationError as exc:
        raise invalid_from_pydantic(exc) from exc
    if not raws:
        raise InvalidRecord("records must not be empty", field="records")
    return [_finish(scrub(raw) if scrub else raw, f"{prefix}{i}." if prefix else "", constitutional_hash, now)
            for i, raw in enumerate(raws)]


def invalid_from_pydantic(exc: PydanticValidationError) -> InvalidRecord:
    errors = [
        {"field": ".".join(str(p) for p in e["loc"]) or "(body)", "message": e["msg"]}
        for e in exc.errors(include_url=False, include_input=False)[:20]
    ]
    first = errors[0]
    return InvalidRecord(f"{first['field']}: {first['message']}", field=first["field"], details={"errors": errors})


def _finish(raw: dict[str, Any], where: str, constitutional_hash: str, now: float) -> dict[str, Any]:
    """The stored record: the raw dict plus id, epoch timestamp, workload type and hash."""
    stamped = raw.get("constitutional_hash")
    if stamped is not None and stamped != constitutional_hash:
        raise InvalidRecord(f"constitutional hash {stamped!r} does not match {constitutional_hash!r}",
                            field=f"{where}constitutional_hash")
    out = dict(raw)
    out["id"] = raw.get("id") or record_id(raw)  # before the default timestamp: a re-post keeps its id
    out["timestamp"] = _epoch(raw.get("timestamp"), f"{where}timestamp", now)
    out["workload_type"] = raw.get("workload_type") or ("tool_calling" if has_tool_call(raw["response"]) else "generic")
    out["constitutional_hash"] = constitutional_hash
    return out


def _epoch(value: float | str | None, where: str, now: float) -> float:
    if value is None:
        return now
    if isinstance(value, int | float):
        return float(value)
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError as exc:
        raise InvalidRecord(f"timestamp must be epoch seconds or ISO-8601, got {value!r:.40}", field=where) from exc


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
    ray_submission_id: str | None = None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workload_id: str = Field(min_length=1, max_length=256)
    client_id: str = Field(min_length=1, max_length=256)
    config: dict[str, Any] | None = None
