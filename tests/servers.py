"""Real Elasticsearch and MongoDB servers for the tests, on free loopback ports.

    python tests/servers.py -- python -m pytest -q tests

starts an Elasticsearch (noida-db, Elasticsearch service only) and a MongoDB
(SecantusDB, WiredTiger underneath) in temporary data dirs, exports
FLYWHEEL_TEST_ES_URI and FLYWHEEL_TEST_MONGO_URI to the command after `--`, runs it,
stops both servers (also on Ctrl-C or failure) and exits with the command's code.

The helpers below are importable (fault tests and benchmarks start servers of their own).
Each server runs in its own session, so stopping it ends its whole process group
(noida-db's console script is a wrapper around a native binary) and nothing else.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ES_ENV = "FLYWHEEL_TEST_ES_URI"
MONGO_ENV = "FLYWHEEL_TEST_MONGO_URI"


@dataclass
class Server:
    name: str
    uri: str
    port: int
    data_dir: Path
    proc: subprocess.Popen
    log_path: Path

    def stop(self, *, kill: bool = False, timeout: float = 15.0) -> None:
        """SIGTERM (a clean shutdown) or SIGKILL (a crash) to the server's process group."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass
        # The console script may exit before the native server it wraps has let go of the port.
        deadline = time.monotonic() + timeout
        while _listening(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def executable(name: str) -> str:
    """A console script of this venv (make runs .venv/bin/python without activating it)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    raise FileNotFoundError(f"{name} not found beside {sys.executable}; "
                            "install the test extra: pip install -e '.[test]'")


def start_elasticsearch(data_dir: str | Path, port: int | None = None, *, timeout: float = 60.0) -> Server:
    port = port or free_port()
    data_dir = Path(data_dir)
    cmd = [executable("noida-db"), "start", "--only", "elasticsearch", "--data-dir", str(data_dir),
           "--elasticsearch-port", str(port)]
    server = _spawn("elasticsearch", f"elasticsearch://127.0.0.1:{port}", port, data_dir, cmd)
    _wait(server, timeout, lambda: _http_ok(port))
    return server


def start_mongodb(data_dir: str | Path, port: int | None = None, *, timeout: float = 60.0,
                  database: str = "flywheel_test") -> Server:
    port = port or free_port()
    data_dir = Path(data_dir)
    # --sync-on-commit: a write is on disk before it is acknowledged, as with mongod's journal.
    cmd = [executable("secantusd-py"), "--host", "127.0.0.1", "--port", str(port),
           "--storage-path", str(data_dir), "--log-level", "WARNING", "--sync-on-commit"]
    server = _spawn("mongodb", f"mongodb://127.0.0.1:{port}/{database}", port, data_dir, cmd)
    _wait(server, timeout, lambda: _mongo_ok(port))
    return server


def _spawn(name: str, uri: str, port: int, data_dir: Path, cmd: list[str]) -> Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}.{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return Server(name, uri, port, data_dir, proc, log_path)


def _wait(server: Server, timeout: float, answers) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}; log:\n{_tail(server.log_path)}")
        if answers():
            return
        time.sleep(0.1)
    server.stop(kill=True)
    raise RuntimeError(f"{server.name} did not answer on port {server.port} within {timeout:.0f}s; "
                       f"log:\n{_tail(server.log_path)}")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _mongo_ok(port: int) -> bool:
    import pymongo

    client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/", serverSelectionTimeoutMS=500,
                                 connectTimeoutMS=500)
    try:
        client.admin.command("ping")
        return True
    except pymongo.errors.PyMongoError:
        return False
    finally:
        client.close()


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("usage: python tests/servers.py -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1:]
    # SIGTERM (CI cancelling the job) takes the same cleanup path as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="flywheel-servers-") as tmp:
        try:
            servers.append(start_elasticsearch(Path(tmp) / "es"))
            servers.append(start_mongodb(Path(tmp) / "mongo"))
            env = {**os.environ, ES_ENV: servers[0].uri, MONGO_ENV: servers[1].uri}
            print(f"servers: {ES_ENV}={servers[0].uri} {MONGO_ENV}={servers[1].uri}", file=sys.stderr, flush=True)
            child = subprocess.Popen(command, env=env)
            try:
                return child.wait()
            except KeyboardInterrupt:
                child.send_signal(signal.SIGINT)
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
                return 130
        except KeyboardInterrupt:
            return 130
        finally:
            for server in servers:
                server.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
