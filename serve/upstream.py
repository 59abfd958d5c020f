"""The production model behind the gateway: any OpenAI-compatible base URL, called with httpx.

Failures become domain errors that name the upstream (502 `upstream_failed`, 504 `upstream_timeout`
in serve/errors.py), so a caller can tell the gateway's faults from the model provider's. An answer
the upstream refuses (4xx: a bad key, an unknown model) goes back to the caller as the upstream
sent it. Streams are relayed chunk by chunk and assembled on the side for the log.
"""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from ray_app.errors import UpstreamFailed, UpstreamTimeout
from ray_app.routes import GatewayConfig


@dataclass
class Refused:
    """A 4xx from the upstream, relayed as is."""
    status: int
    body: bytes


class Upstream:
    def __init__(self, config: GatewayConfig):
        self.url = (config.upstream_url or "").rstrip("/")
        headers = {"Authorization": f"Bearer {config.upstream_api_key}"} if config.upstream_api_key else {}
        self.client = httpx.AsyncClient(timeout=config.timeout_s, headers=headers,
                                        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))

    def _require(self) -> None:
        if not self.url:
            raise UpstreamFailed("no upstream is configured (settings gateway.upstream_url): only routes in "
                                 "mode live can answer", field="gateway.upstream_url")

    async def complete(self, body: dict[str, Any]) -> dict[str, Any] | Refused:
        """A ChatCompletion from the upstream (non-streaming), or its refusal."""
        self._require()
        try:
            response = await self.client.post(f"{self.url}/chat/completions", content=orjson.dumps(
                {**body, "stream": False}), headers={"Content-Type": "application/json"})
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"upstream {self.url} did not answer in time ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise UpstreamFailed(f"upstream {self.url} cannot be reached: {exc!r:.200}") from exc
        return _answer(self.url, response.status_code, response.content)

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[bytes | Refused]:
        """The upstream's SSE lines as they come (each ending in a blank line), or one Refused."""
        self._require()
        try:
            async with self.client.stream("POST", f"{self.url}/chat/completions", content=orjson.dumps(
                    {**body, "stream": True}), headers={"Content-Type": "application/json"}) as response:
                if response.status_code >= 300:
                    answer = _answer(self.url, response.status_code, await response.aread())
                    yield answer
                    return
                async for line in response.aiter_lines():
                    if line:
                        yield (line + "\n\n").encode()
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"upstream {self.url} did not answer in time ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise UpstreamFailed(f"upstream {self.url} cannot be reached: {exc!r:.200}") from exc

    async def close(self) -> None:
        await self.client.aclose()


def _answer(url: str, status: int, content: bytes) -> dict[str, Any] | Refused:
    if 400 <= status < 500:
        return Refused(status, content)
    if status >= 300:
        raise UpstreamFailed(f"upstream {url} answered {status}: {content[:200]!r}")
    try:
        answer = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise UpstreamFailed(f"upstream {url} answered with malformed JSON: {content[:120]!r}") from exc
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list) or not answer["choices"]:
        raise UpstreamFailed(f"upstream {url} answered without choices: {content[:120]!r}")
    return answer


def assemble(lines: list[bytes]) -> dict[str, Any] | None:
    """A streamed answer's SSE lines -> the ChatCompletion they add up to (for the log); None if unreadable."""
    content, calls, first, finish = [], {}, None, None
    for raw in lines:
        text = raw.decode(errors="replace").strip()
        if not text.startswith("data:") or text == "data: [DONE]":
            continue
        try:
            chunk = orjson.loads(text[5:])
        except orjson.JSONDecodeError:
            continue
        first = first or chunk
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            finish = choice.get("finish_reason") or finish
            if delta.get("content"):
                content.append(delta["content"])
            for call in delta.get("tool_calls") or []:
                slot = calls.setdefault(call.get("index", 0), {"id": None, "type": "function",
                                                               "function": {"name": "", "arguments": ""}})
                slot["id"] = call.get("id") or slot["id"]
                fn = call.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
    if first is None:
        return None
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {"id": first.get("id"), "object": "chat.completion", "created": first.get("created"),
            "model": first.get("model"), "choices": [{"index": 0, "message": message, "finish_reason": finish}]}


def stream_chunks(completion: dict[str, Any]) -> list[bytes]:
    """A whole ChatCompletion as the SSE chunks a streaming OpenAI client reads, ending in [DONE]."""
    base = {"id": completion["id"], "object": "chat.completion.chunk", "created": completion["created"],
            "model": completion["model"]}
    choice = completion["choices"][0]
    message = choice["message"]
    delta: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("tool_calls"):
        delta = {"role": "assistant", "content": None,
                 "tool_calls": [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]}
    chunks = [{**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
              {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]}]
    return [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]
