"""One LoRA training run, typed: everything `train_loop_per_worker` (train/lora.py) reads.

The driver builds it once (`TrainRun.for_split`), Ray Train carries it to every worker as plain
JSON in `train_loop_config` (`loop_config`), and each worker validates it once
(`TrainRun.model_validate`) before anything else runs, so a bad value fails there with its name,
not twenty lines into the loop as a KeyError. The training choices themselves are the job's
`training` settings (ray_app/config.py `TrainingConfig`, the same object a YAML file sets); a run
adds what it alone knows: the model, the split files, the seed, its worker's threads, the job that
may cancel it, and what a sweep or a profile asks for.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from ray_app.config import Settings, StrictModel, TrainingConfig


class ProfileConfig(StrictModel):
    """torch.profiler over a few steps (train/step_profile.py): off unless a run names one."""

    folder: Path
    steps: int = Field(5, ge=1)  # steps recorded...
    skip: int = Field(3, ge=0)  # ...after these and one warm-up step


class TrainRun(StrictModel):
    model: str  # a packaged alias, a Hugging Face id or a local folder (evals/models.py)
    settings: Settings  # `training` is this run's choices; `data_dir` and the job store come along
    train_path: Path
    val_path: Path | None = None  # None: no validation loss (a split too small to hold one)
    # the splits the job scores on: none of their requests reaches the public warm-up
    held_out_paths: list[Path] = Field(default_factory=list)
    seed: int = 0
    job_id: str | None = None  # set: the run stops when this job is cancelled (train/jobstate.py CancelProbe)
    cpus_per_worker: int = Field(1, ge=1)  # each worker's CPUs and torch threads
    profile: ProfileConfig | None = None
    placement_file: Path | None = None  # a sweep's trial leaves its worker group's placement group id here

    @property
    def training(self) -> TrainingConfig:
        return self.settings.training

    @property
    def private(self) -> bool:
        return self.settings.training.privacy.enabled

    def loop_config(self) -> dict[str, Any]:
        """What crosses into Ray Train: plain JSON, validated again (once) in the worker."""
        return self.model_dump(mode="json")

    @classmethod
    def for_split(cls, settings: Settings, *, model: str, split_dir: Path, seed: int, job_id: str | None = None,
                  cpus_per_worker: int = 1) -> TrainRun:
        """A run on a job's split folder (train.json, val.json, eval.json; ray_app/pipeline/split.py).
        The val split is used only when it has examples."""
        val = split_dir / "val.json"
        has_val = val.exists() and bool(json.loads(val.read_text()))
        return cls(model=model, settings=settings, train_path=split_dir / "train.json",
                   val_path=val if has_val else None, held_out_paths=[split_dir / "eval.json", val], seed=seed,
                   job_id=job_id or None, cpus_per_worker=cpus_per_worker)
