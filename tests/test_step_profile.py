"""train/step_profile.py inside the real training loop (Ray Train, tiny model): the steps it was
asked for are profiled, and what it records is the run's own work: LoRA B's per-record backward
when private (train/per_record.py), and no Opacus module hooks either way. bench_dp_gpu.py reads these files on a
GPU."""
from __future__ import annotations

import json

import pytest

from tests.test_dp_training import train_run
from train.lora import train_lora
from train.run_config import ProfileConfig


@pytest.mark.parametrize("private", [True, False])
def test_the_profiled_steps_show_the_runs_own_work(private, tiny_model, tmp_path, ray_session):
    folder = tmp_path / "profile"
    run = train_run(tiny_model, tmp_path, max_steps=8, privacy={"enabled": private},
                    profile=ProfileConfig(folder=folder, skip=1, steps=3))
    train_lora(run, num_workers=1, use_gpu=False, storage_path=tmp_path / "ray",
               name=f"profiled-{private}")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["device_seconds"] is None  # no GPU here
    assert 0 < summary["cpu_seconds"] and 0 < summary["wall_seconds"] < 60
    assert summary["top_ops"] and all(op["calls"] > 0 for op in summary["top_ops"])
    trace = (folder / "trace.json").read_text()
    assert trace.count('"ProfilerStep#') == 3  # exactly the steps asked for
    assert ("PerRecordLinearBackward" in trace) is private  # in_layer clipping: B's records' gradients
    assert "BackwardHookFunction" not in trace  # ...computed without Opacus' module hooks
    assert "aten::mm" in (folder / "ops.txt").read_text()
