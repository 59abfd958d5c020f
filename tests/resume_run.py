"""A training run in a Ray instance of its own, for the killed-worker test (tests/test_dp_training.py).

Killing a worker inside the test session's Ray left its later runs stuck (Ray Train's controller
stopped collecting reports), so the fault is injected into a separate instance that dies with it.
Usage: python -m tests.resume_run CONFIG.json OUT.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(config_path: str, out_path: str) -> None:
    import ray

    from ray_app.local_ray import connect
    from train.lora import train_lora
    from train.run_config import TrainRun

    run = TrainRun.model_validate_json(Path(config_path).read_text())
    connect(num_cpus=2, dashboard=False, log_to_driver=False)  # on free ports, stopped at exit
    result = train_lora(run, num_workers=1, use_gpu=False, storage_path=run.settings.data_dir / "ray", name="resume",
                        max_failures=1)
    Path(out_path).write_text(json.dumps(result["metrics"]))
    ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
