"""The cluster deployment, for real: a two-node Ray cluster started with `ray start`, the Serve
app deployed onto it with `serve deploy cluster/serve_config.yaml`, and a real `flywheel run`
sent with `ray job submit --runtime-env cluster/runtime_env.yaml` that Ray must schedule on the
worker node (it asks for a resource only that node has); then two flywheel jobs at once, both
finishing, their run windows overlapping (the NVIDIA blueprint runs one job at a time).
The jobs fine-tune a tiny model built from a config, with a small config YAML passed to the job.

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

# The job `ray job submit` runs (a shell line: `-- sh -c LINE`).
JOB = ("flywheel load {records} && flywheel audit verify && "
       "flywheel run --workload-id {workload_id} --client-id {client_id} --config {config}")


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cluster-shared")


@pytest.fixture(scope="module")
def job_config(shared_dir) -> Path:
    """Small splits, one epoch, a tiny candidate: a whole flywheel run in about a minute."""
    from tests.tiny_models import build_tiny_model

    model = build_tiny_model(shared_dir / "tiny-llama")
    path = shared_dir / "job.yaml"
    path.write_text(yaml.safe_dump({
        "candidates": [{"model": str(model)}],
        "data_split": {"eval_size": 8, "min_total_records": 20, "random_seed": 1},
        "icl_config": {"example_selection": "uniform_distribution", "max_examples": 2},
        "training": {"epochs": 1, "batch_size": 8, "checkpoint_every": 100}}))
    return path


def _flywheel_job(shared_dir: Path, job_config: Path, workload_id: str, n: int = 48) -> str:
    """The entrypoint line for loading `n` tool-calling records of `workload_id` and running its job."""
    from tests.workloads import customer_service_records

    records = shared_dir / f"{workload_id}.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in customer_service_records(n, seed=2,
                                                                                      workload_id=workload_id)))
    return JOB.format(records=records, workload_id=workload_id, client_id="acme", config=job_config)


def _job_record(shared_dir: Path, workload_id: str) -> dict:
    from ray_app.config import load_settings
    from ray_app.storage import open_job_store

    settings = load_settings(env={"FLYWHEEL_DATA_DIR": str(shared_dir / "data")})
    (job,) = open_job_store(settings).list_jobs(workload_id=workload_id)
    return job


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


def test_flywheel_run_submitted_runs_on_the_worker_node(cluster, app_url, shared_dir, job_config):
    workload_id = "w-" + uuid.uuid4().hex[:10]
    entrypoint = _flywheel_job(shared_dir, job_config, workload_id)
    submission_id = f"flywheel-test-{uuid.uuid4().hex[:8]}"
    out = cluster.run(["ray", "job", "submit", "--address", cluster.dashboard_url, "--no-wait",
                       "--submission-id", submission_id, "--runtime-env", "cluster/runtime_env.yaml",
                       "--entrypoint-num-cpus", "0.5", "--entrypoint-resources", json.dumps({WORKER_RESOURCE: 1}),
                       "--", "sh", "-c", entrypoint], cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:]

    status, message = _wait_for_job(cluster, submission_id, timeout=420)
    logs = cluster.run(["ray", "job", "logs", "--address", cluster.dashboard_url, submission_id], timeout=60).stdout
    assert status == "SUCCEEDED", message + logs[-3000:]
    assert "audit chain intact" in logs and "recommendation" in logs
    job = _job_record(shared_dir, workload_id)
    assert job["status"] == "completed", job.get("error")
    report = json.loads((Path(job["report_dir"]) / "report.json").read_text())
    (cand,) = report["candidates"]
    assert cand["status"] == "completed" and cand["evaluations"]["customized"]["n"] == 8
    assert cand["training"]["steps"] >= 1

    # Ray put the driver where the resource is: on the worker node, not the head.
    from ray.job_submission import JobSubmissionClient

    driver_node = JobSubmissionClient(cluster.dashboard_url).get_job_info(submission_id).driver_node_id
    worker = [n for n in cluster.nodes() if WORKER_RESOURCE in n["resources_total"]]
    assert [n["node_id"] for n in worker] == [driver_node]
    # ...and what it loaded there is served by the app on the cluster.
    assert len(_logs(app_url, workload_id)) == 48


def test_two_flywheel_jobs_run_at_once(cluster, shared_dir, job_config):
    """Two workloads' jobs submitted together, each driver asking for a quarter CPU: Ray runs both
    drivers at once and queues their CPU work; both finish, and the run windows stamped on the jobs
    (`started_at` / `finished_at`, written by the jobs themselves) overlap."""
    workloads = ["w-" + uuid.uuid4().hex[:10] for _ in range(2)]
    submitted = []
    for workload_id in workloads:
        out = cluster.run(["ray", "job", "submit", "--address", cluster.dashboard_url, "--no-wait",
                           "--submission-id", f"flywheel-pair-{uuid.uuid4().hex[:8]}",
                           "--runtime-env", "cluster/runtime_env.yaml", "--entrypoint-num-cpus", "0.25",
                           "--", "sh", "-c", _flywheel_job(shared_dir, job_config, workload_id)], cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stdout[-3000:]
        submitted.append(re.search(r"Job '([^']+)' submitted successfully", out.stdout).group(1))
    for sid in submitted:
        status, message = _wait_for_job(cluster, sid, timeout=540)
        logs = cluster.run(["ray", "job", "logs", "--address", cluster.dashboard_url, sid], timeout=60).stdout
        assert status == "SUCCEEDED", message + logs[-3000:]
    jobs = [_job_record(shared_dir, w) for w in workloads]
    assert [j["status"] for j in jobs] == ["completed", "completed"], [j.get("error") for j in jobs]
    (a0, a1), (b0, b1) = sorted((j["started_at"], j["finished_at"]) for j in jobs)
    assert b0 < a1, f"the two jobs did not overlap: {a0:.1f}-{a1:.1f}, {b0:.1f}-{b1:.1f}"


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
