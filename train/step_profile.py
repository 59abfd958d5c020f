"""torch.profiler over a few steps of the training loop: where a step's time goes.

Off unless the run names a `profile` (train/run_config.py; tests/bench/bench_dp_gpu.py sets one, to find
why a DP step on a GPU costs more than the ops it runs). After `profile.skip` steps and one
warm-up step, rank 0 records `profile.steps` steps and writes to `profile.folder`:
  ops.txt       the ops by self time (on a GPU by device time, and ops_cpu.txt by CPU time)
  summary.json  per step: CPU time of all ops, device time of all kernels, wall time, kernel launches
  trace.json    a Chrome / Perfetto trace of those steps
A step whose CPU time far exceeds its device time is bound by Python and launches, not by the GPU.
"""
from __future__ import annotations

import json
import time

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from train.run_config import ProfileConfig


class StepProfiler:
    """Call `step()` after every training step; it does nothing when profiling is off."""

    def __init__(self, asked: ProfileConfig | None, *, device_type: str, rank: int):
        self._profiler: profile | None = None
        if asked is None or rank != 0:
            return
        self.folder, self.cuda = asked.folder, device_type == "cuda"
        self.rank_by = "self_device_time_total" if self.cuda else "self_cpu_time_total"  # what ops are ranked by
        self.steps = asked.steps
        self.folder.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._profiler = profile(
            activities=activities,
            schedule=schedule(wait=asked.skip, warmup=1, active=self.steps, repeat=1),
            on_trace_ready=self._write)
        self._profiler.start()
        self._recording_since: float | None = None

    def step(self) -> None:
        if self._profiler is None:
            return
        self._profiler.step()
        action = self._profiler.current_action.name
        if action.startswith("RECORD") and self._recording_since is None:
            self._recording_since = time.perf_counter()
        if action == "NONE" and self._recording_since is not None:  # the window closed and was written
            self._profiler.stop()
            self._profiler = None

    def _write(self, prof: profile) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - (self._recording_since or time.perf_counter())
        events = prof.key_averages()
        (self.folder / "ops.txt").write_text(events.table(sort_by=self.rank_by, row_limit=40))
        if self.cuda:
            (self.folder / "ops_cpu.txt").write_text(events.table(sort_by="self_cpu_time_total", row_limit=40))
        per_step = 1e-6 / self.steps  # the profiler counts microseconds
        summary = {
            "steps": self.steps,
            "wall_seconds": wall / self.steps,
            "cpu_seconds": sum(e.self_cpu_time_total for e in events) * per_step,
            "device_seconds": sum(e.self_device_time_total for e in events) * per_step if self.cuda else None,
            "kernel_launches": sum(e.count for e in events if e.key in _LAUNCHES) / self.steps,
            "top_ops": [{"op": e.key, "cpu_ms": e.self_cpu_time_total * per_step * 1e3,
                         "device_ms": e.self_device_time_total * per_step * 1e3, "calls": e.count / self.steps}
                        for e in sorted(events, key=lambda e: -getattr(e, self.rank_by))[:15]],
        }
        (self.folder / "summary.json").write_text(json.dumps(summary, indent=1))
        prof.export_chrome_trace(str(self.folder / "trace.json"))


_LAUNCHES = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"}
