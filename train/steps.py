"""One training step's parts, as functions of the step: its learning rate, the passes (forward
and backward) its batch runs in, and the batches themselves, epoch after epoch.

The loop that calls them is train/lora.py's `train_loop_per_worker`.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from ray_app.config import TrainingConfig

# Standard deviations of a Poisson batch's size that DP's planned passes absorb on a GPU (row_slices).
GPU_DP_SPREAD = 1.5


def learning_rate_at(training: TrainingConfig, step: int, total_steps: int) -> float:
    """The rate for `step`: constant, or decaying linearly to 5% of it by the last step."""
    if training.lr_schedule == "linear":
        return training.learning_rate * max(0.05, 1 - step / total_steps)
    return training.learning_rate


def row_slices(rows: int, *, expected: int, microbatch: int, spread: float = 0.0) -> list[slice]:
    """The passes (forward and backward) a batch of `rows` runs in: as many as its expected size
    needs at `microbatch` rows a pass, in equal slices; more only for a batch too large for those
    passes at `microbatch` rows plus `spread` standard deviations of a Poisson batch's size.

    The spread is for DP on a GPU (train/lora.py). DP's Poisson sampling draws a batch whose size
    is random around `expected` (standard deviation about sqrt(expected)), and a hard cap of
    `microbatch` rows adds a pass to every draw above the planned rows: 41% of the steps at batch
    8 of 64 records (microbatch 8), 45% at 32 of 256 (microbatch 32 or 16). On a GPU a pass costs
    about the same whatever its rows (launches, not arithmetic), so those steps cost ~2x. With
    GPU_DP_SPREAD (1.5) a pass may take 12 rows at microbatch 8, 40 at 32 and 20 at 16 (batch
    32), and 5%, 6% and 7% of the steps take a pass more. On a CPU a pass costs its arithmetic:
    no spread, and memory stays bounded by `microbatch` rows. Plain batches never exceed `expected`.
    """
    planned = max(1, -(-expected // microbatch))
    cap = microbatch + int(spread * math.sqrt(expected) / planned)
    passes = min(rows, max(planned, -(-rows // cap)))
    bounds = [rows * i // passes for i in range(passes + 1)]
    return [slice(start, end) for start, end in zip(bounds, bounds[1:], strict=False)]


def forward_backward(module: Any, optimizer: Any, criterion: Any, ids: torch.Tensor, labels: torch.Tensor,
                     mask: torch.Tensor, passes: list[slice], *, private: bool, autocast: Any) -> float:
    """Forward and backward one batch in `passes` (`row_slices`), so the batch DP-SGD wants
    (hundreds of rows) fits in memory; the caller's optimizer.step() then updates as for the whole.

    Private: each slice but the last goes through Opacus' skipped step (its examples are clipped
    and added to the sum; no noise, no update), as its BatchMemoryManager does, so the accountant
    records one step at the batch's sample rate. Plain: each slice's loss is weighted by its share.
    `criterion` (ghost clipping) turns the module's per-record losses into Opacus' two-pass loss.
    Returns the batch's loss.

    The rows go in length order, so each pass holds rows of like length and AnswerLoss trims it to
    its own longest row. Exact: DP clips and sums each record's gradient, plain training weights each
    pass by its share, and neither depends on which rows share a pass.
    """
    order = torch.argsort(mask.sum(dim=1), stable=True)
    ids, labels, mask = ids[order], labels[order], mask[order]
    total = 0.0
    for rows in passes:
        with autocast:
            loss = module(ids[rows], labels[rows], mask[rows])
            loss = criterion(loss) if criterion else loss
        share = len(ids[rows]) / len(ids)
        (loss if private else loss * share).backward()
        total += loss.item() * share
        if private and rows is not passes[-1]:
            optimizer.signal_skip_step(do_skip=True)
            optimizer.step()
            optimizer.zero_grad()
    return total


def cycle(loader: Any) -> Iterator[Any]:
    """The loader's batches without end, reshuffled each epoch."""
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: a new shuffle each epoch
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1
