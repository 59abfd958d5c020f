"""`flywheel serve` as an operator runs it: its own Ray, the app on the given port, Ctrl-C stops it.

Once with Serve's Python proxy in front (Ray's default) and once with HAProxy (`serve.ingress:
haproxy`): there the replicas serve HTTP themselves and an HAProxy process, started by Ray, takes
the port; it must be there while Flywheel serves and gone once it stops.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import chat_record, free_port


def _haproxies() -> set[int]:
    return {proc.pid for proc in psutil.process_iter(["name"]) if proc.info["name"] == "haproxy"}


@pytest.mark.parametrize("ingress", ["proxy", "haproxy"])
def test_flywheel_serve_starts_serves_and_stops(tmp_path, ingress):
    port = free_port()
    config = tmp_path / "flywheel.yaml"
    config.write_text(f"serve: {{ingress: {ingress}}}\n")
    env = dict(os.environ, FLYWHEEL_DATA_DIR=str(tmp_path), FLYWHEEL_ADMIN_KEY="serve-test-key",
               FLYWHEEL_CONFIG=str(config), RAY_ADDRESS="")  # its own local Ray, not the test session's
    before = _haproxies()
    flywheel = Path(sys.executable).with_name("flywheel")
    # SIGINT handled, as in an operator's shell: a runner that started this session in the background
    # of a script hands it down ignored, and `flywheel serve` would then rightly ignore it too. A handler
    # here becomes the default in the child (exec resets handlers; only "ignored" is inherited).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([str(flywheel), "serve", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, inherited)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        headers = {"Authorization": "Bearer serve-test-key"}
        assert httpx.post(f"{url}/v1/logs", json=chat_record("cli-serve", 1), headers=headers).status_code == 200
        assert httpx.get(f"{url}/v1/workloads", headers=headers).json() == [
            {"workload_id": "cli-serve", "client_id": "acme", "count": 1}]
        assert httpx.get(f"{url}/v1/workloads").status_code == 401  # auth holds behind either ingress
        assert (tmp_path / "logs.db").exists()  # the embedded default, in FLYWHEEL_DATA_DIR
        started = _haproxies() - before
        assert bool(started) == (ingress == "haproxy"), started
    finally:
        # SIGINT to `flywheel serve` itself (as `kill -INT` sends it): serve.shutdown() stops the replicas
        # and HAProxy, then Ray stops with the process and its exit stops what names the node (~3 s).
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 90
    while _haproxies() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _haproxies() - before, "HAProxy outlived flywheel serve"
