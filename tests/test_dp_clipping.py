"""The clipping modes (privacy.clipping) with a tiny model and the noise off, so updates compare
within float32's rounding (`tolerance`): a batch in slices updates as in one piece, `in_layer`
(LoRA B's own backward) gives Opacus' hooks' update, ghost clipping the same, a record left out or
a clip 1% off does not, and bf16 autocast leaves the clipped per-record gradients in float32."""
from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from tests.test_dp_training import (
    EPS32,
    PRIVACY,
    RANK,
    absolute_gradient,
    float32_sums,
    peft_tiny,
    write_split,
)
from train import dp
from train.data import load_split
from train.tail import AnswerLoss, causal_lm

RECORDS, SEQ, CLIP = 6, 128, 1e-3  # one batch of 6 records cut to 128 tokens, clipped to norm 1e-3


def one_step(tiny_model: str, tmp_path: Path, clipping: str | None, microbatch: int, freeze_a: bool = False,
             mistake=None) -> tuple[list, object]:
    """The adapter's update in one SGD step (lr 1) on 6 records, run in slices of `microbatch`:
    plain (clipping None) or DP through train.dp.make_private with the noise turned off.
    `mistake(optimizer)` runs just before the step: a deliberate error the comparisons must catch."""
    from train.steps import forward_backward, row_slices

    peft_model, tokenizer = peft_tiny(tiny_model)
    if freeze_a:
        dp.freeze_lora_a(peft_model)
    ids, labels, mask = load_split(write_split(tmp_path, RECORDS, seed=3), tokenizer, SEQ)
    module = AnswerLoss(peft_model)
    params = [p for p in module.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer, criterion, engine = torch.optim.SGD(params, lr=1.0), None, None
    if clipping:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=RECORDS)
        privacy = PRIVACY.model_copy(update={"max_grad_norm": CLIP, "clipping": clipping})
        # noise 0: clipping alone, compared within rounding
        module, optimizer, _, engine, criterion, used = dp.make_private(module, optimizer, loader, privacy=privacy,
                                                                        noise_multiplier=0.0, distributed=False)
        assert used == clipping
    passes = row_slices(len(ids), expected=len(ids), microbatch=microbatch)
    assert len(passes) == -(-len(ids) // microbatch)
    forward_backward(module, optimizer, criterion, ids, labels, mask, passes, private=clipping is not None,
                     autocast=nullcontext())
    if mistake:
        mistake(optimizer)
    optimizer.step()
    # the gradient the step applied, not the weights' difference after it: that would add the
    # weights' own rounding (half their last bit, ~1e-4 of this update) to every comparison
    update = [-p.grad.detach().clone() for p in params]
    assert all(torch.equal(p.detach(), b + u) for p, b, u in zip(params, before, update, strict=True))
    return update, engine


# Ghost clipping gets a record's squared norm as the sum over token pairs (t, s) of (g_t.g_s)(x_t.x_s)
# (Opacus' compute_linear_norm_sample): SEQ**2 terms, whose absolute values add up to 3.6-8.9 times the
# squared norm for these records (float64; the seeded data's, the same on any CPU). Its worst case,
# n·u, would be 0.5% of the clip factor: as much as the mistakes below move the update. Rounding
# errors that are independent and of mean zero (Higham & Mary, SIAM J. Sci. Comput. 41, 2019, thm 3.1)
# keep the sum within λ·sqrt(n)·u of its terms' absolute sum, failing with probability below
# 2n·exp(-λ²/2): 4e-10 at λ = 8.
GHOST_LAMBDA, GRAM_CANCELLATION = 8, 9


def tolerance(tiny_model: str, update: list, *, ghost: bool = False) -> float:
    """How far two float32 computations of the clipped update may differ, as a fraction of CLIP.

    The sums from the batch to the records' gradients and their sum (tests/test_dp_training.py
    `float32_sums`), and the clip norm: the squares of every trained number, none negative, so
    within n·u of it; the root halves that, and each record's clip factor carries it into the
    update: n/2 EPS32 for two runs. CLIP is the scale: every clipped record's gradient has norm at
    most CLIP, so however the records cancel, the absolute values summed into any number of their
    mean stay under it (0.6-0.9 CLIP here with each record's token products in absolute value too).
    ~6e-4; ghost clipping's norm adds ~3e-4. The paths differ by ~1e-7 CLIP on the CPUs tried; the
    mistakes below move the update by 3.6e-2 (a record left out) and 2.3e-3 CLIP (clips 1% long).
    """
    n = float32_sums(tiny_model, SEQ, RECORDS) + sum(t.numel() for t in update) / 2
    if ghost:
        from transformers import AutoConfig

        gram = SEQ**2 + AutoConfig.from_pretrained(tiny_model).intermediate_size + RANK  # the pairs, then each factor
        n += GHOST_LAMBDA * math.sqrt(gram) * GRAM_CANCELLATION / 4  # λ√n·u, halved by the root, u = EPS32 / 2
    return n * EPS32


def same(a: list, b: list, tol: float, scale: float) -> bool:
    """Every number of `a` within tol x scale of `b`'s: float32's bound holds at the scale of the
    sums' terms, not of each result (a small number can be what is left of large ones)."""
    x, y = (torch.cat([t.flatten() for t in run]) for run in (a, b))
    return bool(((x - y).abs() <= tol * scale).all())


def test_a_batch_in_slices_updates_as_in_one_piece(tiny_model, tmp_path):
    """Slices of 2 rows give the whole batch's update, plain and private; per-record gradients
    (hooks) and ghost clipping (norms, then a second pass) clip to the same update, and the
    accountant records one step at the batch's rate however many slices it took."""
    plain, _ = one_step(tiny_model, tmp_path, None, 6)
    peft_model, tokenizer = peft_tiny(tiny_model)  # no clip bound on the plain update: its own terms' scale
    batch = load_split(write_split(tmp_path, RECORDS, seed=3), tokenizer, SEQ)
    scale = max(float(s.max()) for s in absolute_gradient(peft_model, *batch))
    sums = float32_sums(tiny_model, SEQ, RECORDS) * EPS32  # ~5e-4
    assert same(plain, one_step(tiny_model, tmp_path, None, 2)[0], sums, scale)
    hooks, _ = one_step(tiny_model, tmp_path, "hooks", 6)
    for clipping in ("hooks", "ghost"):
        sliced, engine = one_step(tiny_model, tmp_path, clipping, 2)
        assert same(hooks, sliced, tolerance(tiny_model, hooks, ghost=clipping == "ghost"), CLIP), clipping
        assert [(rate, steps) for _, rate, steps in engine.accountant.history] == [(1 / 1, 1)]
    assert same(hooks, one_step(tiny_model, tmp_path, "ghost", 6)[0], tolerance(tiny_model, hooks, ghost=True), CLIP)
    clipped, unclipped = (torch.cat([u.flatten() for u in run]).norm() for run in (hooks, plain))
    assert clipped <= CLIP * (1 + tolerance(tiny_model, hooks)) < unclipped


def test_in_layer_gradients_clip_as_opacus_hooks_do(tiny_model, tmp_path):
    """With only LoRA B training, B's own backward (train/per_record.py) gives the records' gradients
    Opacus' hooks give: the same clipped update, whole and in slices, one accountant step. A second
    backward before the step is refused, and with A training too the mode falls back to hooks."""
    for microbatch in (6, 2):  # the two sum the same products in other orders, by other kernels on other CPUs
        hooks, _ = one_step(tiny_model, tmp_path, "hooks", microbatch, freeze_a=True)
        in_layer, engine = one_step(tiny_model, tmp_path, "in_layer", microbatch, freeze_a=True)
        assert same(hooks, in_layer, tolerance(tiny_model, hooks), CLIP), microbatch
        assert [(rate, steps) for _, rate, steps in engine.accountant.history] == [(1 / 1, 1)]
    plain, _ = one_step(tiny_model, tmp_path, None, 6, freeze_a=True)
    clipped, unclipped = (torch.cat([u.flatten() for u in run]).norm() for run in (hooks, plain))
    # the clip did bind: the equality is not of raw gradients
    assert clipped <= CLIP * (1 + tolerance(tiny_model, hooks)) < unclipped

    for freeze_a, expected in ((False, "hooks"), (True, "in_layer")):
        peft_model, tokenizer = peft_tiny(tiny_model)
        if freeze_a:
            dp.freeze_lora_a(peft_model)
        ids, labels, mask = load_split(write_split(tmp_path, 4, seed=3), tokenizer, 128)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)
        privacy = PRIVACY.model_copy(update={"clipping": "in_layer"})
        module, *_, used = dp.make_private(AnswerLoss(peft_model), torch.optim.SGD(params, lr=1.0), loader,
                                           privacy=privacy, noise_multiplier=0.0, distributed=False)
        assert used == expected
    module(ids, labels, mask).backward()  # the in_layer module, as Opacus' hooks refuse the same
    with pytest.raises(ValueError, match="already set"):
        module(ids, labels, mask).backward()


def test_a_record_left_out_or_a_clip_1_percent_off_exceeds_the_rounding_bound(tiny_model, tmp_path):
    """The tolerance above is no blanket: the mistakes that matter move the update past it, each
    one injected into in_layer's step just before the optimizer clips and sums."""
    hooks, _ = one_step(tiny_model, tmp_path, "hooks", 6, freeze_a=True)
    tol = tolerance(tiny_model, hooks)
    mistakes = {"a record left out": lambda optimizer: [p.grad_sample[2].zero_() for p in optimizer.params],
                "every clip 1% long": lambda optimizer: setattr(optimizer, "max_grad_norm", 1.01 * CLIP)}
    for name, mistake in mistakes.items():
        broken, _ = one_step(tiny_model, tmp_path, "in_layer", 6, freeze_a=True, mistake=mistake)
        assert not same(hooks, broken, tol, CLIP), name
    assert same(hooks, one_step(tiny_model, tmp_path, "in_layer", 6, freeze_a=True)[0], tol, CLIP)  # unbroken


@pytest.mark.parametrize("clipping", ["in_layer", "hooks"])
def test_under_bf16_autocast_records_are_clipped_in_float32(tiny_model, tmp_path, clipping):
    """bf16 autocast (training.matmul_dtype) rounds the frozen base's products, not the adapter's:
    the per-record gradients Opacus clips stay float32, so the clip bound the accountant assumes holds."""
    peft_model, tokenizer = peft_tiny(tiny_model)
    if clipping == "in_layer":
        dp.freeze_lora_a(peft_model)
    ids, labels, mask = load_split(write_split(tmp_path, RECORDS, seed=3), tokenizer, SEQ)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=RECORDS)
    privacy = PRIVACY.model_copy(update={"max_grad_norm": CLIP, "clipping": clipping})
    module, optimizer, *_, used = dp.make_private(AnswerLoss(peft_model), torch.optim.SGD(params, lr=1.0), loader,
                                                  privacy=privacy, noise_multiplier=0.0, distributed=False)
    assert used == clipping
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = causal_lm(peft_model).get_decoder().layers[-1].self_attn.q_proj.base_layer
        assert base(torch.ones(1, base.in_features)).dtype == torch.bfloat16
        loss = module(ids, labels, mask)
    loss.backward()  # outside autocast, as train.steps.forward_backward does: Opacus' hooks run in the backward
    assert {p.grad_sample.dtype for p in params} == {torch.float32}
    per_record = torch.cat([p.grad_sample.flatten(1) for p in params], dim=1).norm(dim=1)
    optimizer.pre_step()  # clip, sum and divide by the expected batch (6), as step() does (noise 0)
    mean = torch.cat([p.grad.flatten() for p in params]).norm()  # the mean of records each clipped to CLIP
    assert (per_record > CLIP).all() and mean <= CLIP * (1 + tolerance(tiny_model, [p.grad for p in params]))
