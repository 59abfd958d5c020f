"""What a training step is made of, as plain functions of the step: its learning rate, and the
passes (forward and backward) a batch runs in."""
from __future__ import annotations

import math

import pytest

from train.steps import GPU_DP_SPREAD, learning_rate_at, row_slices


def test_the_rate_is_constant_or_decays_linearly_to_five_percent():
    from pydantic import ValidationError

    from ray_app.config import TrainingConfig

    constant = TrainingConfig(learning_rate=0.03, lr_schedule="constant")
    linear = TrainingConfig(learning_rate=0.03, lr_schedule="linear")
    assert [learning_rate_at(constant, s, 10) for s in (0, 5, 9)] == [0.03, 0.03, 0.03]
    assert [learning_rate_at(linear, s, 10) for s in (0, 5, 10)] == pytest.approx([0.03, 0.015, 0.0015])
    with pytest.raises(ValidationError, match="cosine"):
        TrainingConfig(lr_schedule="cosine")


def rows_of(passes: list[slice], rows: int) -> list[int]:
    covered = [i for part in passes for i in range(rows)[part]]
    assert covered == list(range(rows))  # every row once, in order
    return [len(range(rows)[part]) for part in passes]


@pytest.mark.parametrize(("rows", "expected", "microbatch", "spread", "sizes"), [
    (32, 32, 16, 0.0, [16, 16]),      # a plain batch: the passes its size needs
    (30, 32, 16, 0.0, [15, 15]),      # a small draw: equal slices, no pass of a few rows
    (37, 32, 16, 0.0, [12, 12, 13]),  # no spread: microbatch rows a pass at most
    (9, 8, 8, 0.0, [4, 5]),
    (37, 32, 16, 1.5, [18, 19]),      # a Poisson draw above the batch: its excess spread over the planned passes
    (41, 32, 16, 1.5, [13, 14, 14]),  # beyond 16 + 1.5 x sqrt(32) / 2 = 20 rows a pass: one more
    (12, 8, 8, 1.5, [12]),            # 8 + 1.5 x sqrt(8) = 12
    (13, 8, 8, 1.5, [6, 7]),
    (40, 32, 32, 1.5, [40]),
    (6, 6, 2, 1.5, [2, 2, 2]),
    (3, 8, 1, 1.5, [1, 1, 1]),        # the planned passes are small: the spread shared by 8 is under a row
    (5, 8, 64, 0.0, [5]),
    (1, 32, 16, 1.5, [1]),            # never an empty pass
])
def test_a_batch_runs_in_the_passes_its_expected_size_needs(rows, expected, microbatch, spread, sizes):
    passes = row_slices(rows, expected=expected, microbatch=microbatch, spread=spread)
    assert rows_of(passes, rows) == sizes
    assert max(sizes) <= microbatch + spread * math.sqrt(expected)


@pytest.mark.parametrize(("records", "batch", "microbatch", "extra"),
                         [(64, 8, 8, 0.06), (256, 32, 32, 0.07), (1000, 32, 16, 0.04)])
def test_poisson_batches_rarely_take_a_pass_more_than_planned(records, batch, microbatch, extra):
    """Over every size a Poisson batch can draw, weighted by its probability: the expected passes
    per step with the GPU's spread, against the plan and against a hard cap of microbatch rows."""
    rate, planned = batch / records, -(-batch // microbatch)

    def passes(spread: float) -> float:
        return sum(math.comb(records, n) * rate ** n * (1 - rate) ** (records - n)
                   * len(row_slices(n, expected=batch, microbatch=microbatch, spread=spread))
                   for n in range(1, records + 1))
    assert planned * 0.99 < passes(GPU_DP_SPREAD) <= planned * (1 + extra)
    assert passes(0.0) > planned * 1.2  # what the spread is for
