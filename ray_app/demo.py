"""`make demo`: the main job on the embedded default, no servers needed.

Starts local Ray + Serve, sends simulated production traffic from three services through
the HTTP API (via the client library), waits for the job the automatic trigger starts on
the customer-service workload, and prints its report and recommendation. Settings load
here, once.
"""
from __future__ import annotations

import re
import secrets
import socket
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from ray_app.config import Settings, load_settings
from ray_app.errors import FlywheelError
from ray_app.plugins import load_plugin
from ray_app.schemas import JobStatus
from ray_app.traffic import post_simulated_traffic

# Not a terminal (a log file, CI): no spinner shows, and tables are drawn at 80 columns unless told wider.
console = Console(width=None if sys.stdout.isatty() else 160)

DEMO_WORKLOAD = "customer-service"
# A few hundred records: 600 posts leave ~470 after de-duplication (~400 to train on). At DP epsilon 8
# the public warm-up (train/public.py) is what carries that few: 0.92 function-name accuracy on a
# 100-example eval set with it, 0.79 without. The other services show the rest.
DEMO_TRAFFIC = {DEMO_WORKLOAD: 600, "generic-assistant": 300, "policy-governance": 300}
# One automatic job, on the tool-calling workload: three at once would not fit 2 CPUs in 20 minutes.
DEMO_SETTINGS = {"jobs": {"launch": True, "auto_trigger": True, "auto_trigger_workloads": [DEMO_WORKLOAD]}}


def _port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:  # taken (an earlier `flywheel serve`?): any free port will do
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    """Block until the app at `url` answers /healthz (Serve replicas take seconds to start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise FlywheelError(f"the app at {url} did not become healthy in {timeout:.0f} s")


def show_workloads(url: str, key: str) -> None:
    table = Table(title="Stored records per workload (after dedup and PII scrubbing)")
    for col in ("workload_id", "client_id", "count"):
        table.add_column(col)
    for w in httpx.get(f"{url}/v1/workloads", headers={"Authorization": f"Bearer {key}"}).json():
        table.add_row(w["workload_id"], w["client_id"], str(w["count"]))
    console.print(table)


def run_demo(settings: Settings, *, traffic: dict[str, int] = DEMO_TRAFFIC) -> None:
    key = settings.admin_key or "demo-" + secrets.token_urlsafe(16)
    settings = settings.with_overrides({**DEMO_SETTINGS, "admin_key": key})
    console.rule(f"[bold]Flywheel demo[/] (embedded stores in {settings.data_dir})")
    with console.status("starting Ray and the Serve app..."):
        url = load_plugin("deploy")(settings, port=_port(settings.serve.port))
        wait_healthy(url)
    console.print(f"Serve app up at {url}")
    earlier = {j["id"] for j in _jobs(url, key, DEMO_WORKLOAD)}
    with console.status(f"posting {sum(traffic.values())} records from {len(traffic)} simulated services..."):
        counts = post_simulated_traffic(url, api_key=key, per_service=traffic)
    console.print("posted: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    show_workloads(url, key)
    job = wait_for_job(url, key, DEMO_WORKLOAD, earlier=earlier, log=settings.data_dir / "demo.log")
    if job["status"] != JobStatus.COMPLETED:
        raise FlywheelError(f"job {job['id']} ended {job['status']}: {job.get('error')}")
    report_dir = settings.data_dir / "reports" / job["id"]
    console.print(Markdown(for_terminal((report_dir / "report.md").read_text(), report_dir)))
    console.print(f"report: {report_dir}/report.json and report.md")
    console.print(f"registered: `flywheel models list`; serve it beside your production model with "
                  f"`flywheel deploy {job['id']} --mode shadow` (docs/gateway.md)")


def for_terminal(markdown: str, folder: Path) -> str:
    """report.md for a terminal: each embedded plot becomes its file's path (rich would draw an
    image link as an emoji and its alt text, and the path is what a reader can open)."""
    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", lambda m: f"{m[1]} plot: `{folder / m[2]}`", markdown)


def _jobs(url: str, key: str, workload_id: str) -> list[dict]:
    return httpx.get(f"{url}/v1/jobs", params={"workload_id": workload_id},
                     headers={"Authorization": f"Bearer {key}"}).json()["jobs"]


def wait_for_job(url: str, key: str, workload_id: str, *, earlier: set[str], timeout: float = 3600.0,
                 trigger_wait: float = 30.0, log: Path | None = None) -> dict:
    """Follow the job this run's traffic started, stage by stage, until it finishes: a spinner on a
    terminal, and a line per change of stage, printed and appended to `log`, anywhere.

    On a data dir whose workload already had its automatic job, the new records may not reach
    the next trigger mark (jobs.retrigger_every): then the demo starts the job itself (POST
    /v1/jobs) rather than show an old report.
    """
    headers = {"Authorization": f"Bearer {key}"}
    deadline, started, shown = time.monotonic() + timeout, time.monotonic(), ""
    with console.status("waiting for the automatic trigger...") as status:
        while time.monotonic() < deadline:
            jobs = [j for j in _jobs(url, key, workload_id) if j["id"] not in earlier]
            if not jobs and time.monotonic() - started > trigger_wait:
                jobs = [httpx.post(f"{url}/v1/jobs", headers=headers,
                                   json={"workload_id": workload_id, "client_id": "acme"}).json()]
                console.print(f"no automatic trigger (the workload had its job before): started {jobs[0]['id']}")
            if jobs:
                job = httpx.get(f"{url}/v1/jobs/{jobs[0]['id']}", headers=headers).json()
                running = [s["name"] for s in job["stages"] if s["status"] == JobStatus.RUNNING]
                line = f"job {job['id']} ({job['trigger']}): {job['status']} {', '.join(running)}"
                if line != shown:
                    shown = line
                    _progress(f"{line} [{time.monotonic() - started:.0f} s]", log)
                status.update(f"{line} [{time.monotonic() - started:.0f} s]")
                if job["status"] in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED):
                    return job
            time.sleep(2)
    raise FlywheelError(f"no finished job for {workload_id} within {timeout:.0f} s")


def _progress(line: str, log: Path | None) -> None:
    console.print(f"  {line}")
    if log is not None:
        with log.open("a") as out:
            out.write(f"{time.strftime('%H:%M:%S')} {line}\n")


def main() -> int:
    try:
        run_demo(load_settings())
    except FlywheelError as exc:
        console.print(f"[red]error:[/] {exc.message}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
