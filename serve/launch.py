"""Starting the Serve app: Ray (Flywheel's own, or the cluster RAY_ADDRESS names), Serve, the app.

`flywheel serve` calls `run_forever`; tests and benches call `deploy`, which returns at once.
"""
from __future__ import annotations

import time
from typing import Any

from ray import serve

from ray_app.config import Settings
from ray_app.local_ray import connect, free_ports
from serve.app import build_app


def ray_runtime_env(settings: Settings) -> dict[str, Any] | None:
    """The runtime env for the job that starts Serve: Ray's own switches the settings ask for, or None.
    Serve's processes read them as they start, so on a cluster where Serve already runs they belong in
    every node's environment before `ray start` instead (cluster/README.md). HAProxy's stats and metrics
    listeners default to ports 8404 and 9101 on every interface: free ones instead, so a second Serve
    with HAProxy on the host starts too."""
    if settings.serve.ingress != "haproxy":
        return None
    stats, metrics = free_ports(2)
    return {"env_vars": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
                         "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics)}}


def deploy(settings: Settings, *, host: str | None = None, port: int | None = None, name: str = "flywheel",
           route_prefix: str = "/") -> str:
    """Start (or connect to) Ray, deploy the app, return its base URL. Does not block.

    Several apps (say, one per store backend) can share one Serve instance under
    different names and route prefixes.
    """
    # joins the cluster RAY_ADDRESS names; else a Ray of its own, on free ports beside any other
    connect(namespace="flywheel", runtime_env=ray_runtime_env(settings))
    host = host or settings.serve.host
    port = settings.serve.port if port is None else port
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings), name=name, route_prefix=route_prefix)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def run_forever(settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
    url = deploy(settings, host=host, port=port)
    print(f"Flywheel is serving on {url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
