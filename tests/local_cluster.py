"""A real two-node Ray cluster on this machine, started with `ray start`, torn down by its temp dir.

Other Ray instances run on the same machine (other test sessions, other helpers), so nothing
here may touch them: every port is picked free and passed explicitly (two raylets on one host
would otherwise both want the dashboard agent's default port), the cluster gets its own
`--temp-dir` (one for both nodes, as one host has: with two, `ray job logs` reads the head's
copy of a driver log the worker node wrote), and teardown kills exactly the processes whose
command line names that temp dir, plus their descendants (the workers and job drivers the
raylets started).
`ray stop` cannot do that: it stops every Ray process of the user, whatever the cluster.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from ray_app.local_ray import free_ports

VENV_BIN = Path(sys.executable).parent  # `ray`, `serve` and `flywheel` live beside this interpreter


def processes_of(marker: str) -> set[psutil.Process]:
    """Every live process whose command line names `marker` (a temp dir), and their descendants."""
    found: set[psutil.Process] = set()
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and any(marker in arg for arg in proc.info["cmdline"] or ()):
                found.add(proc)
                found.update(proc.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


class LocalCluster:
    """`ray start --head` plus one `ray start --address` worker node, both on 127.0.0.1."""

    def __init__(self, *, env: dict[str, str], head_cpus: int = 2, worker_cpus: int = 1,
                 worker_resources: dict[str, float] | None = None):
        # Short: Ray's unix sockets live under the temp dir and their paths must fit in 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="flywheel-ray-", dir="/tmp"))
        # The cluster's FLYWHEEL_* settings are exactly `env`: none leak in from the caller's shell.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_") and k != "RAY_ADDRESS"}
        self.env = {**inherited, **env,
                    "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    # Explicit, so neither node picks up a token from ~/.ray that the other lacks.
                    "RAY_AUTH_MODE": "disabled",
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.worker_resources = worker_resources or {}
        (self.gcs_port, self.dashboard_port, self.client_port, *self._agent_ports) = free_ports(11)

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> LocalCluster:
        head_agent, worker_agent = self._agent_ports[:4], self._agent_ports[4:8]
        self._ray_start("--head", f"--port={self.gcs_port}", f"--num-cpus={self.head_cpus}",
                        "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={self.dashboard_port}",
                        f"--ray-client-server-port={self.client_port}", *self._node_ports(head_agent))
        self._ray_start(f"--address={self.gcs_address}", f"--num-cpus={self.worker_cpus}",
                        f"--resources={json.dumps(self.worker_resources)}", *self._node_ports(worker_agent))
        return self

    def _node_ports(self, ports: list[int]) -> list[str]:
        listen, grpc, runtime_env, metrics = ports
        return [f"--dashboard-agent-listen-port={listen}", f"--dashboard-agent-grpc-port={grpc}",
                f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}"]

    def _ray_start(self, *args: str) -> None:
        temp_dir = self.root / "ray"
        temp_dir.mkdir(exist_ok=True)
        cmd = ["ray", "start", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
               "--disable-usage-stats", *args]
        proc = self.run(cmd, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout[-3000:]}")

    def run(self, cmd: list[str], *, timeout: float = 120, cwd: str | Path | None = None
            ) -> subprocess.CompletedProcess:
        """A CLI command against this cluster (stdout and stderr together)."""
        return subprocess.run(cmd, env=self.env, cwd=cwd, timeout=timeout, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def nodes(self) -> list[dict]:
        out = self.run(["ray", "list", "nodes", "--address", self.dashboard_url, "--format", "json",
                        "--filter", "state=ALIVE"], timeout=60)
        if out.returncode != 0:
            return []
        start = out.stdout.find("[")
        return json.loads(out.stdout[start:]) if start >= 0 else []

    def wait_for_nodes(self, n: int, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = self.nodes()
            if len(nodes) >= n:
                return nodes
            time.sleep(1.0)
        raise TimeoutError(f"{n} nodes did not come up in {timeout:.0f}s; alive: {self.nodes()}")

    # ---- teardown ----------------------------------------------------------------------

    def processes(self) -> set[psutil.Process]:
        """Every live process of this cluster: those naming our temp dir, and their descendants."""
        return processes_of(str(self.root))

    def stop(self, grace: float = 5.0) -> None:
        for _ in range(3):  # a dying raylet may still spawn a worker: look again until nothing is left
            procs = self.processes()
            if not procs:
                break
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
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
