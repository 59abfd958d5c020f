"""Flywheel's own Ray beside another on the same machine: `make demo`'s path (its own Ray, the app,
posted traffic, the automatic trigger, the Ray job, the report) while a plain `ray start --head`
holds Ray's default ports, as a Ray user's laptop has one. Before ray_app/local_ray.py the job died
with "No available agent to submit job": both dashboard agents wanted port 52365.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.local_cluster import VENV_BIN, processes_of

DEMO = textwrap.dedent("""
    from ray_app.config import load_settings
    from ray_app.demo import run_demo
    run_demo(load_settings(), traffic={"customer-service": 70})
""")


@pytest.fixture
def foreign_ray():
    """A plain `ray start --head` on Ray's default ports, in a temp dir that names its processes."""
    root = Path(tempfile.mkdtemp(prefix="foreign-ray-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        out = subprocess.run([str(VENV_BIN / "ray"), "start", "--head", f"--temp-dir={root}", "--disable-usage-stats",
                              "--num-cpus=1"], env=env, text=True, capture_output=True, timeout=180, check=False)
        assert out.returncode == 0, f"the plain Ray did not start (is one already on the default ports?):\n" \
                                    f"{out.stdout[-2000:]}{out.stderr[-2000:]}"
        yield root
    finally:
        for proc in processes_of(str(root)):
            proc.kill()
        shutil.rmtree(root, ignore_errors=True)


def _config(tmp_path: Path, tiny_model: str) -> Path:
    config = tmp_path / "flywheel.yaml"
    config.write_text(textwrap.dedent(f"""
        data_split: {{eval_size: 8, val_ratio: 0.1, min_total_records: 30, random_seed: 1}}
        icl_config: {{example_selection: uniform_distribution, max_examples: 2}}
        candidates: [{{model: "{tiny_model}"}}]
        training: {{epochs: 1, batch_size: 8, learning_rate: 0.001, checkpoint_every: 2,
                    public_warmup: {{steps: 0}}}}
        evaluation: {{compare_free: false}}
        serve: {{ingest_replicas: 1}}
    """))
    return config


def test_the_demos_path_runs_beside_a_plain_ray_on_the_default_ports(foreign_ray, tmp_path, tiny_model):
    env = dict(os.environ, FLYWHEEL_DATA_DIR=str(tmp_path / "data"), FLYWHEEL_CONFIG=str(_config(tmp_path, tiny_model)),
               RAY_ADDRESS="", HF_HUB_OFFLINE="1", TERM="dumb")
    proc = subprocess.Popen([sys.executable, "-c", DEMO], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=900)
    demo = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    output = demo.stdout[-3000:] + demo.stderr[-3000:]
    assert demo.returncode == 0, output
    assert "report:" in demo.stdout, output  # the job ran as a Ray job through our own Jobs API
    # progress without a terminal: a line per stage, on stdout and in the data dir's demo.log
    progress = [line.split(" ", 1)[1] for line in (tmp_path / "data" / "demo.log").read_text().splitlines()]
    assert len(progress) >= 2 and ": completed" in progress[-1], progress
    assert all(line.rsplit(" [", 1)[0] in demo.stdout for line in progress)
    reports = list((tmp_path / "data" / "reports").glob("*/report.json"))
    assert len(reports) == 1, output
    # the other Ray is untouched: its raylet and GCS still run
    names = {p.name() for p in processes_of(str(foreign_ray))}
    assert {"raylet", "gcs_server"} <= names, names
    # and the demo's own Ray went with it: no process left naming its temp dir, the dir removed
    assert not list(Path("/tmp").glob(f"flywheel-ray-*/session_*_{proc.pid}"))  # Ray names it by its driver
