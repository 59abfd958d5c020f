"""The cluster deployment, for real: a two-node Ray cluster started with `ray start`, the Serve
app deployed onto it with `serve deploy cluster/serve_config.yaml`, and a flywheel job sent
with `ray job submit --runtime-env cluster/runtime_env.yaml` that Ray must schedule on the
worker node (it asks for a resource only that node has).

Both nodes share FLYWHEEL_DATA_DIR (one host, so the embedded SQLite stores are shared), which
is how the records the job loads on the worker node show up through the API on the cluster.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.local_cluster import LocalCluster, free_ports

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "cluster-admin-" + uuid.uuid4().hex
WORKER_RESOURCE = "flywheel_worker"  # only the worker node has it: a job asking for it must run there

# The job `ray job submit` runs (a shell line: `-- sh -c LINE`), and a line its logs must contain.
# `flywheel run` is the target; with a tiny candidate it did not finish within 5 minutes on this
# two-node cluster sharing 2 busy cores, so the job loads records and verifies the audit chain for now.
JOB = ("flywheel load {records} && flywheel audit verify", "audit chain intact")


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cluster-shared")


@pytest.fixture(scope="module")
def cluster(shared_dir):
    env = {"FLYWHEEL_DATA_DIR": str(shared_dir / "data"), "FLYWHEEL_ADMIN_KEY": ADMIN_KEY,
           "HF_HUB_OFFLINE": "1"}
    with LocalCluster(env=env, head_cpus=2, worker_cpus=1, worker_resources={WORKER_RESOURCE: 1}) as c:
        c.wait_for_nodes(2)
        yield c


@pytest.fixture(scope="module")
def app_url(cluster, shared_dir) -> str:
    """`serve deploy` of cluster/serve_config.yaml, on a free port."""
    config = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    port = free_ports(1)[0]
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    # Both nodes share one host: a proxy per node (EveryNode) would have two proxies fight for the port.
    config["proxy_location"] = "HeadOnly"
    path = shared_dir / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = cluster.run(["serve", "deploy", str(path), "--address", cluster.dashboard_url], timeout=120)
    assert out.returncode == 0, out.stdout[-3000:]
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url, cluster, timeout=120)
    return url


def _wait_healthy(url: str, cluster: LocalCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).json() == {"status": "ok"}:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1.0)
    status = cluster.run(["serve", "status", "--address", cluster.dashboard_url], timeout=60)
    raise TimeoutError(f"/healthz did not answer in {timeout:.0f}s; serve status:\n{status.stdout[-3000:]}")


def _record(workload_id: str, i: int, client_id: str = "acme") -> dict:
    return {"workload_id": workload_id, "client_id": client_id, "timestamp": 1_700_000_000 + i,
            "request": {"model": "big", "messages": [{"role": "user", "content": f"How do I reset password {i}?"}]},
            "response": {"choices": [{"index": 0, "message": {"role": "assistant",
                                                              "content": f"Open settings, step {i}."}}]}}


def _logs(url: str, workload_id: str) -> list[dict]:
    r = httpx.get(f"{url}/v1/logs", params={"workload_id": workload_id, "limit": 1000},
                  headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    r.raise_for_status()
    return r.json()["records"]


def test_two_nodes_with_their_resources(cluster):
    nodes = cluster.wait_for_nodes(2)
    cpus = sorted(n["resources_total"]["CPU"] for n in nodes)
    assert cpus == [1.0, 2.0]
    assert [n["is_head_node"] for n in nodes if WORKER_RESOURCE in n["resources_total"]] == [False]


def test_serve_deploy_ingests_records(app_url):
    workload_id = "w-" + uuid.uuid4().hex[:10]
    body = {"records": [_record(workload_id, i) for i in range(5)]}
    r = httpx.post(f"{app_url}/v1/logs", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 5
    stored = _logs(app_url, workload_id)
    assert len(stored) == 5
    assert {rec["constitutional_hash"] for rec in stored} == {"cdd01ef066bc6cf2"}
    # Without a key the cluster's app refuses, as the local one does.
    assert httpx.post(f"{app_url}/v1/logs", json=body, timeout=30).status_code == 401


def test_job_submit_runs_on_the_worker_node(cluster, app_url, shared_dir):
    workload_id, client_id = "w-" + uuid.uuid4().hex[:10], "acme"
    records = shared_dir / f"{workload_id}.jsonl"
    records.write_text("".join(json.dumps(_record(workload_id, i, client_id)) + "\n" for i in range(60)))
    entrypoint, expected_log = JOB
    entrypoint = entrypoint.format(records=records, workload_id=workload_id, client_id=client_id)
    submission_id = f"flywheel-test-{uuid.uuid4().hex[:8]}"
    out = cluster.run(["ray", "job", "submit", "--address", cluster.dashboard_url, "--no-wait",
                       "--submission-id", submission_id, "--runtime-env", "cluster/runtime_env.yaml",
                       "--entrypoint-num-cpus", "0.5", "--entrypoint-resources", json.dumps({WORKER_RESOURCE: 1}),
                       "--", "sh", "-c", entrypoint], cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:]

    status, message = _wait_for_job(cluster, submission_id, timeout=120)
    logs = cluster.run(["ray", "job", "logs", "--address", cluster.dashboard_url, submission_id], timeout=60).stdout
    assert status == "SUCCEEDED", message + logs[-3000:]
    assert expected_log in logs

    # Ray put the driver where the resource is: on the worker node, not the head.
    from ray.job_submission import JobSubmissionClient

    driver_node = JobSubmissionClient(cluster.dashboard_url).get_job_info(submission_id).driver_node_id
    worker = [n for n in cluster.nodes() if WORKER_RESOURCE in n["resources_total"]]
    assert [n["node_id"] for n in worker] == [driver_node]
    # ...and what it loaded there is served by the app on the cluster.
    assert len(_logs(app_url, workload_id)) == 60


def _wait_for_job(cluster: LocalCluster, submission_id: str, timeout: float) -> tuple[str, str]:
    """Poll `ray job status` until the job is terminal; returns its status and the command's output."""
    deadline = time.monotonic() + timeout
    status = "UNKNOWN"
    while time.monotonic() < deadline:
        out = cluster.run(["ray", "job", "status", "--address", cluster.dashboard_url, submission_id], timeout=60)
        status = _parse_status(out.stdout) or status
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status, out.stdout
        time.sleep(2.0)
    raise TimeoutError(f"job {submission_id} still {status} after {timeout:.0f}s")


def _parse_status(text: str) -> str | None:
    """`ray job status` prints "Job 'X' succeeded|failed|was stopped" or "Status for job 'X': RUNNING"."""
    found = re.search(r"Status for job '[^']+': (\w+)", text)
    if found:
        return found.group(1)
    found = re.search(r"Job '[^']+' (succeeded|failed|was stopped)", text)
    return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[found.group(1)] if found else None


def test_jobs_queue_on_ray_resources(cluster, shared_dir):
    """Several jobs at once: those asking for the worker's one `flywheel_worker` run one after the
    other; those asking only for half a CPU each run side by side. Each job stamps its own start
    and end, so the overlap is measured, not inferred from Ray's bookkeeping."""
    stamps = shared_dir / "stamps"
    stamps.mkdir()
    line = f"date +%s.%N > {stamps}/$0.start; sleep 4; date +%s.%N > {stamps}/$0.end"

    def submit(name: str, *resources: str) -> str:
        out = cluster.run(["ray", "job", "submit", "--address", cluster.dashboard_url, "--no-wait",
                           "--submission-id", f"{name}-{uuid.uuid4().hex[:6]}", *resources,
                           "--", "sh", "-c", line, name], timeout=60)
        assert out.returncode == 0, out.stdout[-2000:]
        return re.search(r"Job '([^']+)' submitted successfully", out.stdout).group(1)

    exclusive = [submit(f"excl{i}", "--entrypoint-num-cpus", "0.5", "--entrypoint-resources",
                        json.dumps({WORKER_RESOURCE: 1})) for i in range(2)]
    shared = [submit(f"shared{i}", "--entrypoint-num-cpus", "0.5") for i in range(2)]
    for sid in exclusive + shared:
        status, message = _wait_for_job(cluster, sid, timeout=90)
        assert status == "SUCCEEDED", message

    def window(name: str) -> tuple[float, float]:
        return float((stamps / f"{name}.start").read_text()), float((stamps / f"{name}.end").read_text())

    (a0, a1), (b0, b1) = sorted(window(f"excl{i}") for i in range(2))
    assert b0 >= a1, f"two jobs ran at once on one unit of {WORKER_RESOURCE}: {a0:.1f}-{a1:.1f}, {b0:.1f}-{b1:.1f}"
    (c0, c1), (d0, d1) = sorted(window(f"shared{i}") for i in range(2))
    assert d0 < c1, f"jobs asking for half a CPU each did not overlap: {c0:.1f}-{c1:.1f}, {d0:.1f}-{d1:.1f}"


def test_launcher_asks_for_the_configured_resources(cluster, shared_dir):
    """`submit_flywheel_job` passes jobs.entrypoint_resources / entrypoint_num_cpus to Ray: the
    driver lands on the node holding the resource, and a driver asking for more CPUs than any
    node has waits PENDING."""
    from ray.job_submission import JobSubmissionClient

    from ray_app.config import load_settings
    from ray_app.launcher import submit_flywheel_job

    settings = load_settings(env={"FLYWHEEL_DATA_DIR": str(shared_dir / "data")})
    client = JobSubmissionClient(cluster.dashboard_url)

    def submit(**jobs) -> str:
        job = {"id": "job-" + uuid.uuid4().hex[:10], "workload_id": "w-launcher", "client_id": "acme"}
        return submit_flywheel_job(settings.with_overrides({"jobs": jobs}), job, address=cluster.dashboard_url)

    pinned = submit(entrypoint_num_cpus=0.25, entrypoint_resources={WORKER_RESOURCE: 1})
    too_big = submit(entrypoint_num_cpus=64)
    _wait_for_job(cluster, pinned, timeout=90)  # how `flywheel run` ends is not this test's business
    worker = [n["node_id"] for n in cluster.nodes() if WORKER_RESOURCE in n["resources_total"]]
    assert [client.get_job_info(pinned).driver_node_id] == worker
    assert client.get_job_info(too_big).status == "PENDING"
    client.stop_job(too_big)
