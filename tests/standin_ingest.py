"""A stand-in for the Serve app's ingest routes, for client tests and the client bench.

Validation is the real one (`ray_app.schemas.parse_ingest_body`), so a 422 names fields as the
service does (`records.3.request.messages`). Records are stored by id, so a batch posted twice is
stored once; `posts[id]` counts how often an id was accepted. The server can be stopped (its
port refuses connections, open keep-alive connections are cut) and started again on the same
port with its store intact (GET /v1/logs reads it back as the service does), told to answer
the next N posts with 503 + Retry-After, to refuse every key (401), or to sleep before answering;
`missing_routes = N` answers the next N posts of any path as Ray Serve's proxy does while the app
is being deployed (404, plain text).
"""
from __future__ import annotations

import random
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import orjson

from ray_app.config import CONSTITUTIONAL_HASH
from ray_app.errors import InvalidRecord
from ray_app.schemas import parse_ingest_body

_FEEDBACK = re.compile(r"^/v1/logs/([^/]+)/feedback$")


class IngestStandIn:
    def __init__(self, *, api_key: str = "test-key", port: int = 0, max_records: int = 5000):
        self.api_key, self.port, self.max_records = api_key, port, max_records
        self.lock = threading.Lock()
        self.store: dict[str, dict] = {}
        self.posts: Counter[str] = Counter()
        self.batches: list[tuple[float, int, int]] = []  # (time, status, records in the body)
        self.delay = 0.0
        self.held = 0  # posts to /v1/logs being held by `delay` right now
        self.refuse_keys = False
        self.lose_answers = 0  # store the next N batches, then cut the connection instead of answering
        self.missing_routes = 0  # answer the next N posts with the Serve proxy's 404
        self._failures: list[tuple[int, float | None]] = []
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> IngestStandIn:
        if self._server is not None:
            return self
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self.lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:  # a stopped service does not answer on old keep-alive sockets either
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def fail_next(self, n: int, *, status: int = 503, retry_after: float | None = None) -> None:
        with self.lock:
            self._failures += [(status, retry_after)] * n

    def post_times(self) -> list[float]:
        with self.lock:
            return [t for t, _, _ in self.batches]

    def __enter__(self) -> IngestStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler_for(standin: IngestStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def setup(self) -> None:
            super().setup()
            with standin.lock:
                standin._connections.add(self.connection)

        def finish(self) -> None:
            with standin.lock:
                standin._connections.discard(self.connection)
            super().finish()

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/healthz":
                return self._answer(200, {"status": "ok"})
            if self.headers.get("Authorization") != f"Bearer {standin.api_key}":
                return self._answer(401, {"error": "unauthorized", "message": "missing or unknown key"})
            if url.path != "/v1/logs":
                return self._answer(404, {"error": "not_found", "message": self.path})
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            with standin.lock:
                records = [r for r in standin.store.values()
                           if all(r.get(k) == query[k] for k in ("workload_id", "client_id") if k in query)]
            records.sort(key=lambda r: r["timestamp"], reverse=True)
            self._answer(200, {"records": records[:int(query.get("limit", 100))]})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with standin.lock:
                missing, standin.missing_routes = standin.missing_routes > 0, max(0, standin.missing_routes - 1)
            if missing:  # Serve's proxy before the app is up: no route, no auth, plain text
                self._record(404, 0)
                return self._answer(404, f"Path '{self.path}' not found. Ping http://.../-/routes for "
                                         "available routes.")
            if self.headers.get("Authorization") != f"Bearer {standin.api_key}" or standin.refuse_keys:
                return self._answer(401, {"error": "unauthorized", "message": "missing or unknown key"})
            match = _FEEDBACK.match(self.path)
            if match:
                return self._feedback(match.group(1), body)
            if self.path != "/v1/logs":
                return self._answer(404, {"error": "not_found", "message": self.path})
            if standin.delay:
                with standin.lock:
                    standin.held += 1
                time.sleep(standin.delay)
                with standin.lock:
                    standin.held -= 1
            with standin.lock:
                failure = standin._failures.pop(0) if standin._failures else None
            try:
                payload = orjson.loads(body)
                size = len(payload.get("records", [payload])) if isinstance(payload, dict) else 0
            except orjson.JSONDecodeError as exc:
                return self._answer(400, {"error": "invalid_input", "message": f"malformed JSON: {exc}"})
            if failure is not None:
                status, retry_after = failure
                headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
                self._record(status, size)
                return self._answer(status, {"error": "store_unavailable", "message": "try later"}, headers)
            try:
                records = parse_ingest_body(payload, constitutional_hash=CONSTITUTIONAL_HASH,
                                            max_records=standin.max_records)
            except InvalidRecord as exc:
                self._record(422, size)
                return self._answer(422, exc.to_dict())
            with standin.lock:
                for record in records:
                    standin.store.setdefault(record["id"], record)
                    standin.posts[record["id"]] += 1
            self._record(200, size)
            with standin.lock:
                lose, standin.lose_answers = standin.lose_answers > 0, max(0, standin.lose_answers - 1)
            if lose:  # stored, but the client never hears so: it must retry with the same ids
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self._answer(200, {"accepted": len(records), "ids": [r["id"] for r in records]})

        def _feedback(self, record_id: str, body: bytes) -> None:
            with standin.lock:
                record = standin.store.get(record_id)
                if record is not None:
                    record["feedback"] = orjson.loads(body)
            if record is None:
                return self._answer(404, {"error": "not_found", "message": f"no record {record_id!r}"})
            self._answer(200, {"id": record_id, "updated": True})

        def _record(self, status: int, size: int) -> None:
            with standin.lock:
                standin.batches.append((time.monotonic(), status, size))

        def _answer(self, status: int, payload: dict | str, headers: dict[str, str] | None = None) -> None:
            text = isinstance(payload, str)
            data = payload.encode() if text else orjson.dumps(payload)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8" if text else "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client or stop() cut the connection
                self.close_connection = True

    return Handler


def free_port() -> int:
    """A free port below the ephemeral range: a client retrying against a stopped server on an
    ephemeral port can be handed that very port as its source port (and connect to itself)."""
    low, _ = (int(v) for v in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    for _ in range(100):
        port = random.randrange(max(1024, low - 12_000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def make_record(i: int, *, workload_id: str = "client-tests", **extra: object) -> dict:
    """A valid chat record; `i` makes its content unique."""
    return {"workload_id": workload_id, "client_id": "acme",
            "request": {"model": "m", "messages": [{"role": "user", "content": f"question {i}"}]},
            "response": {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer {i}"},
                                      "finish_reason": "stop"}]}, **extra}
