"""Log every chat completion an `openai` client makes to Flywheel: sync or async, streamed or not.

    client = instrument(OpenAI(), flywheel, workload_id="support-bot", client_id="acme")
    answer = client.chat.completions.create(model=..., messages=...)   # unchanged ChatCompletion
    flywheel.feedback(record_id_of(answer), rating=5)

A plain response is returned as the very object the SDK made (the record id rides on it as the
attribute `flywheel_record_id`, outside its fields, so `model_dump()` is unchanged). A stream is
handed back as a pass-through of the SDK's stream: the caller sees the same chunks, and when the
stream ends its chunks are reassembled into one ChatCompletion (content deltas joined, tool-call
deltas merged by index, argument fragments concatenated) and logged. A stream abandoned before
its end is not logged: half an answer is no training data. Logging never raises into the caller.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import time
from typing import Any

from ray_app.client.core import new_record_id

logger = logging.getLogger("flywheel.client.openai")

# transport and streaming switches: not part of the ChatCompletion request a record keeps
_NOT_REQUEST = {"stream", "stream_options", "extra_headers", "extra_query", "extra_body", "timeout"}
_last_record_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("flywheel_record_id", default=None)


def instrument(openai_client: Any, flywheel_client: Any, *, workload_id: str, client_id: str,
               workload_type: str | None = None, service_name: str | None = None) -> Any:
    """Patch `openai_client.chat.completions.create` (OpenAI or AsyncOpenAI) in place; returns the client."""
    completions = openai_client.chat.completions
    original = completions.create
    if getattr(original, "__flywheel__", False):
        raise ValueError("this OpenAI client is already instrumented")
    tags = {"workload_id": workload_id, "client_id": client_id}
    if workload_type:
        tags["workload_type"] = workload_type
    if service_name:
        tags["service_name"] = service_name
    log = functools.partial(_log, flywheel_client, tags)

    def create(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = original(*args, **kwargs)
        if inspect.isawaitable(result):  # AsyncOpenAI: hand back a coroutine the caller awaits
            async def finish() -> Any:
                return _after(await result, kwargs, started, log)
            return finish()
        return _after(result, kwargs, started, log)

    functools.update_wrapper(create, original)
    create.__flywheel__ = True
    completions.create = create
    return openai_client


def record_id_of(response_or_stream: Any) -> str | None:
    """The id of the record logged for this response (for a stream: known at once, logged at its end)."""
    return getattr(response_or_stream, "flywheel_record_id", None)


def last_record_id() -> str | None:
    """The id of the last call made in this thread or asyncio task."""
    return _last_record_id.get()


def _after(result: Any, kwargs: dict[str, Any], started: float, log: Any) -> Any:
    record_id = new_record_id()
    _last_record_id.set(record_id)
    if kwargs.get("stream"):
        def finish(response: dict[str, Any], first_chunk_at: float | None) -> None:
            metrics = {"latency_ms": (time.perf_counter() - started) * 1e3}
            if first_chunk_at is not None:
                metrics["time_to_first_token_ms"] = (first_chunk_at - started) * 1e3
            log(record_id, kwargs, response, metrics)
        wrapper = _AsyncLoggedStream if hasattr(result, "__anext__") else _LoggedStream
        return wrapper(result, finish, record_id)
    try:
        response = result.model_dump(mode="json", exclude_unset=True)
        object.__setattr__(result, "flywheel_record_id", record_id)
    except Exception:  # not a ChatCompletion (a raw-response call): nothing to log
        logger.warning("flywheel: cannot log a %s", type(result).__name__, exc_info=True)
        return result
    log(record_id, kwargs, response, {"latency_ms": (time.perf_counter() - started) * 1e3})
    return result


def _log(flywheel_client: Any, tags: dict[str, str], record_id: str, kwargs: dict[str, Any],
         response: dict[str, Any], metrics: dict[str, float]) -> None:
    try:
        request = {k: _jsonable(v) for k, v in kwargs.items() if k not in _NOT_REQUEST and not _omitted(v)}
        flywheel_client.log({"id": record_id, "timestamp": time.time(), **tags, "request": request,
                             "response": response, "performance_metrics": metrics})
    except Exception:  # the service's call succeeded; losing its log must not fail it
        logger.warning("flywheel: could not log record %s", record_id, exc_info=True)


def _omitted(value: Any) -> bool:
    return type(value).__name__ in ("NotGiven", "Omit")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if not _omitted(v)}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude_unset=True)
    return value


class StreamAssembler:
    """Chunks of a streamed chat completion -> the one ChatCompletion dict they add up to."""

    def __init__(self) -> None:
        self.meta: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.calls: dict[int, dict[int, dict[str, Any]]] = {}  # choice index -> tool-call index -> call
        self.usage: Any = None
        self.first_chunk_at: float | None = None

    def add(self, chunk: Any) -> None:
        if self.first_chunk_at is None:
            self.first_chunk_at = time.perf_counter()
        for key in ("id", "model", "created", "system_fingerprint", "service_tier"):
            if getattr(chunk, key, None) is not None:
                self.meta.setdefault(key, getattr(chunk, key))
        if getattr(chunk, "usage", None) is not None:
            self.usage = chunk.usage.model_dump(mode="json", exclude_unset=True)
        for choice in chunk.choices or []:
            slot = self.choices.setdefault(choice.index, {
                "index": choice.index, "message": {"role": "assistant", "content": None}, "finish_reason": None})
            message, delta = slot["message"], choice.delta
            if delta is not None:
                if delta.role:
                    message["role"] = delta.role
                if delta.content:
                    message["content"] = (message["content"] or "") + delta.content
                if getattr(delta, "refusal", None):
                    message["refusal"] = (message.get("refusal") or "") + delta.refusal
                for part in delta.tool_calls or []:
                    self._merge_call(choice.index, part)
            if choice.finish_reason:
                slot["finish_reason"] = choice.finish_reason

    def _merge_call(self, choice_index: int, part: Any) -> None:
        calls = self.calls.setdefault(choice_index, {})
        call = calls.setdefault(part.index, {"id": None, "type": "function",
                                             "function": {"name": "", "arguments": ""}})
        if part.id:
            call["id"] = part.id
        if part.type:
            call["type"] = part.type
        if part.function is not None:  # names and arguments arrive as fragments to concatenate
            call["function"]["name"] += part.function.name or ""
            call["function"]["arguments"] += part.function.arguments or ""

    def response(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self.choices):
            slot = self.choices[index]
            if index in self.calls:
                slot["message"]["tool_calls"] = [self.calls[index][i] for i in sorted(self.calls[index])]
            choices.append(slot)
        out = {"object": "chat.completion", **self.meta, "choices": choices}
        if self.usage is not None:
            out["usage"] = self.usage
        return out


class _LoggedStream:
    """The SDK's stream, chunk for chunk; logs the reassembled response when it is exhausted."""

    def __init__(self, stream: Any, finish: Any, record_id: str):
        self._stream, self._finish, self._assembler = stream, finish, StreamAssembler()
        self.flywheel_record_id = record_id

    def __iter__(self) -> _LoggedStream:
        return self

    def __next__(self) -> Any:
        try:
            chunk = next(self._stream)
        except StopIteration:
            self._end()
            raise
        self._assembler.add(chunk)
        return chunk

    def _end(self) -> None:
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish(self._assembler.response(), self._assembler.first_chunk_at)

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> _LoggedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:  # .response and anything else the SDK's stream has
        return getattr(self._stream, name)


class _AsyncLoggedStream(_LoggedStream):
    def __aiter__(self) -> _AsyncLoggedStream:
        return self

    async def __anext__(self) -> Any:
        try:
            chunk = await self._stream.__anext__()
        except StopAsyncIteration:
            self._end()
            raise
        self._assembler.add(chunk)
        return chunk

    async def close(self) -> None:
        await self._stream.close()

    async def __aenter__(self) -> _AsyncLoggedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
