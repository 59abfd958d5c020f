"""A local OpenAI-compatible upstream for the gateway's tests and bench: the production model's stand-in.

`POST /v1/chat/completions` answers as OpenAI does, streaming (SSE chunks, then `[DONE]`) or not:
with a call to the request's first tool when it offers tools (its required arguments filled with
"x"), else a short text. `mode` makes it fail as real upstreams do: "down" (500), "slow" (sleeps
`delay` first), "refuse" (401). `calls` counts the requests it answered.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson


def answer_for(body: dict[str, Any]) -> dict[str, Any]:
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    fn = tools[0].get("function", tools[0]) if tools else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        listed = (fn.get("parameters") or {}).get("required") if isinstance(fn.get("parameters"), dict) else None
        required = [k for k in listed if isinstance(k, str)] if isinstance(listed, list) else []
        message = {"role": "assistant", "content": None, "tool_calls": [{
            "id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
            "function": {"name": fn["name"], "arguments": json.dumps({k: "x" for k in required})}}]}
        finish = "tool_calls"
    else:
        message, finish = {"role": "assistant", "content": "Upstream says hello."}, "stop"
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model") or "upstream-model",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def chunks_of(answer: dict[str, Any]) -> list[bytes]:
    base = {k: answer[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    message = answer["choices"][0]["message"]
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    if message.get("tool_calls"):
        call = message["tool_calls"][0]
        args = call["function"]["arguments"]
        deltas += [{"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                    "function": {"name": call["function"]["name"], "arguments": ""}}]},
                   {"tool_calls": [{"index": 0, "function": {"arguments": args[:len(args) // 2]}}]},
                   {"tool_calls": [{"index": 0, "function": {"arguments": args[len(args) // 2:]}}]}]
    else:
        deltas += [{"content": word + " "} for word in message["content"].split()]
    out = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    out.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": answer["choices"][0]["finish_reason"]}]})
    return [b"data: " + orjson.dumps(c) + b"\n\n" for c in out] + [b"data: [DONE]\n\n"]


class Upstream:
    def __init__(self) -> None:
        self.mode, self.delay, self.calls = "ok", 0.0, 0
        self.lock = threading.Lock()
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Upstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body leave at once, not 40 ms apart (delayed ACK)

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = orjson.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                if upstream.mode == "slow":
                    time.sleep(upstream.delay)
                if upstream.mode == "down":
                    return self._send(500, b'{"error": {"message": "upstream is down"}}')
                if upstream.mode == "refuse":
                    return self._send(401, b'{"error": {"message": "invalid api key", "code": "invalid_api_key"}}')
                with upstream.lock:
                    upstream.calls += 1
                answer = answer_for(body)
                if body.get("stream"):
                    return self._send(200, b"".join(chunks_of(answer)), "text/event-stream")
                return self._send(200, orjson.dumps(answer))

        return Handler
