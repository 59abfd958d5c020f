"""A Ray of Flywheel's own on this machine, beside any other Ray: every port free, its own temp dir.

`ray.init()` with no address starts a local Ray on Ray's default ports (dashboard 8265, dashboard
agent 52365, ...): a second Ray on the host (a Ray user's laptop, a second demo, a benchmark) then
loses its Jobs API ("No available agent to submit job") or worse, and `ray stop`, the obvious fix,
stops every Ray of the user. `ray.init()` cannot move the agents' ports; `ray start` can. So when no
cluster is named (RAY_ADDRESS unset or empty), Flywheel starts a head with `ray start --head`, every
port it lets us set picked free, in a temp dir of its own, connects to it, and at exit stops exactly
the processes naming that temp dir and their descendants. The head runs in a session of its own: a
terminal's Ctrl-C reaches `flywheel serve`, which shuts Serve down while Ray still runs.

Token auth: with RAY_AUTH_MODE unset, a head started here turns token auth on when ~/.ray/auth_token
exists (or creates it), but `ray.init(address=...)` reads that file only for address "auto": a driver
connecting by address then fails with "InvalidAuthToken ... RAY_AUTH_MODE is currently 'disabled'".
`_agree_on_auth` applies Ray's own rule in this process too (and so in what it starts), before it
connects to our head or to a cluster RAY_ADDRESS names. An explicit RAY_AUTH_MODE is left alone.
"""
from __future__ import annotations

import atexit
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

from ray_app.config import ray_cluster_named
from ray_app.errors import FlywheelError

RAY = Path(sys.executable).with_name("ray")  # the `ray` CLI beside this interpreter, venv or not
AGENT_PORTS = 4  # per node: dashboard agent (HTTP, gRPC), runtime-env agent, metrics export


class RayStartError(FlywheelError):
    """`ray start` failed: its output is in the message."""


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


def node_port_flags() -> list[str]:
    """`ray start` flags giving one node's agents free ports (two raylets on a host share none)."""
    listen, grpc, runtime_env, metrics = free_ports(AGENT_PORTS)
    return [f"--dashboard-agent-listen-port={listen}", f"--dashboard-agent-grpc-port={grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}"]


def processes_naming(marker: str) -> set[psutil.Process]:
    """Every live process whose command line names `marker` (a temp dir), and their descendants."""
    found: set[psutil.Process] = set()
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in arg for arg in proc.info["cmdline"] or ()):
                found.add(proc)
                found.update(proc.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_processes(marker: str, grace: float = 5.0) -> None:
    """Terminate (then kill) the processes `processes_naming(marker)` finds, until none is left."""
    for _ in range(3):  # a dying raylet may still spawn a worker: look again
        procs = processes_naming(marker)
        if not procs:
            return
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)


class LocalRay:
    """A head node started with `ray start --head` on free ports; `stop()` ends exactly it."""

    def __init__(self, *, num_cpus: int | None = None, dashboard: bool = True):
        # Short: Ray's unix sockets live under the temp dir and their paths must fit in 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="flywheel-ray-", dir="/tmp"))
        self.gcs_port, self.dashboard_port, self.client_port = free_ports(3)
        self.num_cpus, self.dashboard = num_cpus, dashboard
        self.node_id = ""  # set once connected (`connect`)

    @property
    def address(self) -> str:
        # the node's own address, as ray.init() picks it (Ray turns 127.0.0.1 into it when connecting)
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> LocalRay:
        args = [str(RAY), "start", "--head", f"--port={self.gcs_port}",
                f"--temp-dir={self.root / 'ray'}", "--disable-usage-stats",
                f"--include-dashboard={'true' if self.dashboard else 'false'}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={self.client_port}",
                *node_port_flags(), *([f"--num-cpus={self.num_cpus}"] if self.num_cpus else [])]
        # A session of its own: a terminal's Ctrl-C (SIGINT to the foreground group) must not reach Ray.
        proc = subprocess.run(args, check=False, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=180, start_new_session=True)
        if proc.returncode != 0:
            self.stop()
            raise RayStartError(f"`ray start --head` failed ({proc.returncode}): {proc.stdout[-2000:]}")
        return self

    def stop(self) -> None:
        stop_processes(str(self.root))
        if self.node_id:  # what Ray starts outside the temp dir names the node: HAProxy's config
            stop_processes(self.node_id)
        shutil.rmtree(self.root, ignore_errors=True)


def connect(*, namespace: str | None = None, runtime_env: dict[str, Any] | None = None,
            num_cpus: int | None = None, dashboard: bool = True, log_to_driver: bool = True) -> LocalRay | None:
    """`ray.init` for Flywheel's entry points: nothing when Ray is up in this process; the cluster
    RAY_ADDRESS names when set (a Ray job's driver, a cluster of the operator's); else a Ray of our
    own (`LocalRay`), stopped when this process exits. Returns that own Ray, or None."""
    import ray

    if ray.is_initialized():
        return None
    if ray_cluster_named():
        _agree_on_auth()
        ray.init(namespace=namespace, runtime_env=runtime_env, log_to_driver=log_to_driver)
        return None
    # Serve's switches (runtime_env's env_vars) reach its processes through this driver's job
    local = LocalRay(num_cpus=num_cpus, dashboard=dashboard).start()

    def shut_down() -> None:
        ray.shutdown()
        local.stop()

    atexit.register(shut_down)
    _agree_on_auth()
    ray.init(address=local.address, namespace=namespace, runtime_env=runtime_env, log_to_driver=log_to_driver)
    local.node_id = ray.get_runtime_context().get_node_id()
    return local


def _agree_on_auth() -> None:
    """Token auth on in this process when RAY_AUTH_MODE is unset and a token file exists: what `ray
    start` and `ray.init(address="auto")` decide, which `ray.init(address=HOST:PORT)` skips."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
