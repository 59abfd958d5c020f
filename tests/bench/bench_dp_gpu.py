"""DP-LoRA on a GPU: bench_dp's step rows on CUDA (bf16 autocast, NCCL process group), same model.

At batch 8 (the CPU rows' batch) and at batch 32 (the training default), 40 steps a run: a step
this small on an H100 is mostly kernel launches and per-step bookkeeping, so the DP/non-private
ratio says more about overheads than about the cost of privacy. Then one profiled run of each
(train/step_profile.py): CPU-side time, GPU time and kernel launches per step, with the op tables
kept as results/profile_*.txt. Without a GPU it measures nothing and the stored rows (with the
machine they came from) stay in the table.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from tests.bench.bench_dp import profile_rows, step_rows
from tests.bench.bench_flywheel import _shared_model_cache


def run() -> list[dict] | None:
    import torch

    from ray_app.local_ray import connect

    if not torch.cuda.is_available():
        return None
    connect(dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-dp-gpu-") as tmp:
        data_dir = Path(tmp)
        _shared_model_cache(data_dir)
        # 5 epochs (40 steps) a run: the first steps on a GPU pay for kernel selection and caches
        return (step_rows(data_dir, gpu=True, epochs=5) + step_rows(data_dir, gpu=True, batch=32, epochs=5)
                + profile_rows(data_dir, gpu=True, keep=Path(__file__).with_name("results")))


if __name__ == "__main__":
    for row in run() or []:
        print(row)
