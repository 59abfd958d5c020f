"""Ray for Flywheel's entry points: join the cluster RAY_ADDRESS names, or start one beside any other.

`ray.init()` with no address starts a local Ray on Ray's default ports for what it does not take as
arguments (dashboard agent 52365, its gRPC and metrics ports, the runtime-env agent), and in the
shared /tmp/ray: a second Ray on the host (a Ray user's laptop, a second demo, a benchmark) then loses
its Jobs API ("No available agent to submit job"), and `ray stop`, the obvious fix, stops every Ray of
the user. `connect` starts that local Ray with every one of those ports free and a temp dir of its
own, and keeps what `ray.init` gives a local Ray: its processes share the driver's fate (they end
with it, however it ends) and `ray.shutdown()` stops them.

Ray has no argument for the agents' ports in `ray.init`, only in `ray start` (which detaches the
cluster from the process that starts it); `_free_agent_ports` sets them on the node parameters
`ray.init` builds, for that one call.

Token auth (RAY_AUTH_MODE, ~/.ray/auth_token) is Ray's own rule: `ray.init()` with no address, local
or joining RAY_ADDRESS, turns it on when a token file exists, so this process and its cluster agree.
"""
from __future__ import annotations

import atexit
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from ray_app.config import ray_cluster_named


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextmanager
def _free_agent_ports() -> Iterator[None]:
    """While it is open, a head node `ray.init` starts takes free ports for its dashboard agent (HTTP and
    gRPC), runtime-env agent, metrics export and Ray client server instead of Ray's fixed defaults."""
    from ray._private import parameter

    original = parameter.RayParams.__init__
    listen, grpc, runtime_env, metrics, client = free_ports(5)

    def with_free_ports(params: Any, *args: Any, **kwargs: Any) -> None:
        original(params, *args, **kwargs)
        if params.gcs_address is None:  # a node this call starts, not a connection to one
            params.dashboard_agent_listen_port, params.metrics_agent_port = listen, grpc
            params.runtime_env_agent_port, params.metrics_export_port = runtime_env, metrics
            params.ray_client_server_port = client

    parameter.RayParams.__init__ = with_free_ports
    try:
        yield
    finally:
        parameter.RayParams.__init__ = original


def connect(*, namespace: str | None = None, runtime_env: dict[str, Any] | None = None,
            num_cpus: int | None = None, dashboard: bool = True, log_to_driver: bool = True) -> None:
    """`ray.init` for Flywheel's entry points: nothing when Ray is up in this process; the cluster
    RAY_ADDRESS names when set (a Ray job's driver, an operator's cluster); else a local Ray on free
    ports in a temp dir of its own, which ends with this process."""
    import ray

    if ray.is_initialized():
        return
    if ray_cluster_named():
        ray.init(namespace=namespace, runtime_env=runtime_env, log_to_driver=log_to_driver)
        return
    # Short: Ray's unix sockets live under the temp dir and their paths must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="flywheel-ray-", dir="/tmp"))
    with _free_agent_ports():
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 dashboard_port=free_ports(1)[0], namespace=namespace, runtime_env=runtime_env,
                 log_to_driver=log_to_driver, _temp_dir=str(root))
    # Registered after ray.init, so it runs before Ray's own atexit (which then has nothing left to do).
    atexit.register(_clean_up, root, ray.get_runtime_context().get_node_id())
    if threading.current_thread() is threading.main_thread():
        # Ray's own SIGTERM handler ends the process at once, past atexit: a process manager's stop
        # would leave what Ray started outside its fate-sharing (HAProxy) running. Exit as Python does.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def _clean_up(root: Path, node_id: str) -> None:
    """At exit: Ray stopped, then what still names the node (Serve's HAProxy, whose actor may have died
    before it: its config lives in /tmp/haproxy-serve/NODE_ID), then the temp dir, once no process of
    the node is left writing its logs there."""
    import ray

    ray.shutdown()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = False
        for proc in psutil.process_iter(["cmdline"]):
            try:
                cmdline = proc.info["cmdline"] or ()
                if any(node_id in arg for arg in cmdline):
                    proc.kill()
                left = left or any(str(root) in arg for arg in cmdline)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if not left:
            break
        time.sleep(0.2)
    shutil.rmtree(root, ignore_errors=True)
