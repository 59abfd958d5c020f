"""The OpenAI wrapper: the real `openai` SDK against a fake OpenAI server, logging to a real ingest server."""
from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from openai import AsyncOpenAI, OpenAI

from ray_app.client import AsyncFlywheelClient, FlywheelClient
from ray_app.client.openai_wrapper import instrument, last_record_id, record_id_of
from tests.standin_ingest import IngestStandIn

KEY = "test-key"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]


def _chunk(delta: dict, finish: str | None = None, **extra) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "fake-llm",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


# argument fragments interleave across two tool calls, as real servers send them
TOOL_STREAM = [
    _chunk({"role": "assistant", "content": None}),
    _chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                            "function": {"name": "get_weather", "arguments": ""}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
    _chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                            "function": {"name": "get_time", "arguments": '{"tz"'}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    _chunk({"tool_calls": [{"index": 1, "function": {"arguments": ': "CET"}'}}]}),
    _chunk({}, "tool_calls", usage={"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}),
]
TEXT_STREAM = [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "Hel"}),
               _chunk({"content": "lo, "}), _chunk({"content": "world"}), _chunk({}, "stop")]
EXPECTED_CALLS = [
    {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}},
]


def _completion(content: str) -> dict:
    return {"id": "chatcmpl-2", "object": "chat.completion", "created": 1700000000, "model": "fake-llm",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


class FakeOpenAI(BaseHTTPRequestHandler):
    """POST /v1/chat/completions: canned JSON, or an SSE stream (tool calls when tools are offered)."""

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not body.get("stream"):
            data = json.dumps(_completion("echo: " + body["messages"][-1]["content"])).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
        for chunk in TOOL_STREAM if body.get("tools") else TEXT_STREAM:
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture(scope="module")
def fake_openai():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture
def ingest():
    with IngestStandIn(api_key=KEY) as standin:
        yield standin


@pytest.fixture
def flywheel(ingest, tmp_path):
    client = FlywheelClient(ingest.url, api_key=KEY, spool_dir=tmp_path, flush_interval=0.05)
    yield client
    client.close()


def _sdk(cls, url):
    return cls(base_url=url, api_key="sk-fake", max_retries=0)


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


def test_sync_call_is_returned_unchanged_and_logged_with_tags(fake_openai, ingest, flywheel):
    client = instrument(_sdk(OpenAI, fake_openai), flywheel, workload_id="support", client_id="acme")
    answer = client.chat.completions.create(model="fake-llm", messages=MESSAGES, temperature=0.2)
    plain = _sdk(OpenAI, fake_openai).chat.completions.create(model="fake-llm", messages=MESSAGES, temperature=0.2)
    assert answer.model_dump() == plain.model_dump()
    rid = record_id_of(answer)
    assert rid and rid == last_record_id()
    assert flywheel.flush(5)
    stored = ingest.store[rid]
    assert (stored["workload_id"], stored["client_id"]) == ("support", "acme")
    assert stored["request"] == {"model": "fake-llm", "messages": MESSAGES, "temperature": 0.2}
    assert stored["response"]["choices"][0]["message"]["content"] == "echo: hi there"
    assert stored["workload_type"] == "generic" and stored["performance_metrics"]["latency_ms"] > 0


def test_sync_stream_passes_chunks_through_and_logs_the_reassembled_tool_calls(fake_openai, ingest, flywheel):
    client = instrument(_sdk(OpenAI, fake_openai), flywheel, workload_id="tools", client_id="acme",
                        workload_type="tool_calling")
    stream = client.chat.completions.create(model="fake-llm", messages=MESSAGES, tools=TOOLS, stream=True)
    seen = [chunk.model_dump() for chunk in stream]
    plain = _sdk(OpenAI, fake_openai).chat.completions.create(model="fake-llm", messages=MESSAGES, tools=TOOLS,
                                                              stream=True)
    assert seen == [chunk.model_dump() for chunk in plain]
    assert flywheel.flush(5)
    stored = ingest.store[record_id_of(stream)]
    assert "stream" not in stored["request"] and stored["request"]["tools"] == TOOLS
    choice = stored["response"]["choices"][0]
    assert choice["message"]["tool_calls"] == EXPECTED_CALLS
    assert choice["message"]["content"] is None and choice["finish_reason"] == "tool_calls"
    assert stored["response"]["usage"]["total_tokens"] == 21 and stored["workload_type"] == "tool_calling"
    assert stored["performance_metrics"]["time_to_first_token_ms"] <= stored["performance_metrics"]["latency_ms"]


def test_text_stream_joins_content_and_an_abandoned_stream_is_not_logged(fake_openai, ingest, flywheel):
    client = instrument(_sdk(OpenAI, fake_openai), flywheel, workload_id="support", client_id="acme")
    with client.chat.completions.create(model="fake-llm", messages=MESSAGES, stream=True) as stream:
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == "Hello, world"
    abandoned = client.chat.completions.create(model="fake-llm", messages=MESSAGES, stream=True)
    next(iter(abandoned))
    abandoned.close()
    assert flywheel.flush(5)
    assert ingest.store[record_id_of(stream)]["response"]["choices"][0]["message"]["content"] == "Hello, world"
    assert record_id_of(abandoned) not in ingest.store and len(ingest.store) == 1


def test_async_calls_and_streams(fake_openai, ingest, tmp_path):
    async def main():
        async with AsyncFlywheelClient(ingest.url, api_key=KEY, spool_dir=tmp_path, flush_interval=0.05) as fw:
            client = instrument(_sdk(AsyncOpenAI, fake_openai), fw, workload_id="async", client_id="acme")
            answer = await client.chat.completions.create(model="fake-llm", messages=MESSAGES)
            assert last_record_id() == record_id_of(answer)
            stream = await client.chat.completions.create(model="fake-llm", messages=MESSAGES, tools=TOOLS,
                                                          stream=True)
            chunks = [chunk async for chunk in stream]
            assert await fw.flush(5)
            await fw.feedback(record_id_of(answer), rating="thumbs_up")
            return answer, stream, chunks

    answer, stream, chunks = asyncio.run(main())
    assert len(chunks) == len(TOOL_STREAM)
    assert ingest.store[record_id_of(answer)]["response"]["choices"][0]["message"]["content"] == "echo: hi there"
    assert ingest.store[record_id_of(answer)]["feedback"] == {"rating": "thumbs_up"}
    assert ingest.store[record_id_of(stream)]["response"]["choices"][0]["message"]["tool_calls"] == EXPECTED_CALLS


def test_feedback_on_a_logged_call(fake_openai, ingest, flywheel):
    client = instrument(_sdk(OpenAI, fake_openai), flywheel, workload_id="support", client_id="acme")
    answer = client.chat.completions.create(model="fake-llm", messages=MESSAGES)
    assert flywheel.feedback(record_id_of(answer), rating=5) == {"id": record_id_of(answer), "updated": True}
    assert ingest.store[record_id_of(answer)]["feedback"] == {"rating": 5}


def test_a_failing_flywheel_never_fails_the_call(fake_openai, ingest, tmp_path):
    closed = FlywheelClient(ingest.url, api_key=KEY, spool_dir=tmp_path)
    closed.close()  # log() now raises ClientClosed: the wrapper must swallow it
    client = instrument(_sdk(OpenAI, fake_openai), closed, workload_id="support", client_id="acme")
    answer = client.chat.completions.create(model="fake-llm", messages=MESSAGES)
    assert answer.choices[0].message.content == "echo: hi there"
    with pytest.raises(ValueError, match="already instrumented"):
        instrument(client, closed, workload_id="support", client_id="acme")
