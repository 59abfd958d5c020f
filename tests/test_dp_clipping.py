"""The clipping modes (privacy.clipping) with a tiny model and the noise off, so updates compare
exactly: a batch in slices updates as in one piece, `in_layer` (LoRA B's own backward) gives
Opacus' hooks' update, ghost clipping the same within rounding, and bf16 autocast leaves the
clipped per-record gradients in float32."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from tests.test_dp_training import PRIVACY, peft_tiny, write_split
from train import dp
from train.data import load_split
from train.tail import AnswerLoss, causal_lm


def one_step(tiny_model: str, tmp_path: Path, clipping: str | None, microbatch: int,
             freeze_a: bool = False) -> tuple[list, object]:
    """The adapter's update after one SGD step (lr 1) on 6 records, run in slices of `microbatch`:
    plain (clipping None) or DP through train.dp.make_private with the noise turned off."""
    from train.steps import forward_backward, row_slices

    peft_model, tokenizer = peft_tiny(tiny_model)
    if freeze_a:
        dp.freeze_lora_a(peft_model)
    ids, labels, mask = load_split(write_split(tmp_path, 6, seed=3), tokenizer, 128)
    module = AnswerLoss(peft_model)
    params = [p for p in module.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer, criterion, engine = torch.optim.SGD(params, lr=1.0), None, None
    if clipping:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=6)
        privacy = {**PRIVACY, "max_grad_norm": 1e-3, "clipping": clipping}
        # noise 0: an exact comparison, clipping alone
        module, optimizer, _, engine, criterion, used = dp.make_private(module, optimizer, loader, privacy=privacy,
                                                                        noise_multiplier=0.0, distributed=False)
        assert used == clipping
    passes = row_slices(len(ids), expected=len(ids), microbatch=microbatch)
    assert len(passes) == -(-len(ids) // microbatch)
    forward_backward(module, optimizer, criterion, ids, labels, mask, passes, private=clipping is not None,
                     autocast=nullcontext())
    optimizer.step()
    return [p.detach() - b for p, b in zip(params, before, strict=True)], engine


def same(a: list, b: list, tol: float = 1e-4) -> bool:
    """Equal up to float32 rounding, at the scale of the whole update (a tensor whose own update is
    ~1e-7 is rounding noise, and its own maximum is no scale to compare it at)."""
    x, y = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return torch.allclose(x, y, rtol=tol, atol=tol * float(y.abs().max()))


# Ghost clipping gets each record's norm from products of activations and output gradients, not from
# the materialized gradient: in float32 the two agree to ~1e-4 of the update's scale (measured 9.5e-5).
GHOST_TOL = 1e-3


def test_a_batch_in_slices_updates_as_in_one_piece(tiny_model, tmp_path):
    """Slices of 2 rows give the whole batch's update, plain and private; per-record gradients
    (hooks) and ghost clipping (norms, then a second pass) clip to the same update, and the
    accountant records one step at the batch's rate however many slices it took."""
    plain, _ = one_step(tiny_model, tmp_path, None, 6)
    assert same(plain, one_step(tiny_model, tmp_path, None, 2)[0])
    hooks, _ = one_step(tiny_model, tmp_path, "hooks", 6)
    for clipping in ("hooks", "ghost"):
        sliced, engine = one_step(tiny_model, tmp_path, clipping, 2)
        assert same(hooks, sliced, GHOST_TOL if clipping == "ghost" else 1e-4), clipping
        assert [(rate, steps) for _, rate, steps in engine.accountant.history] == [(1 / 1, 1)]
    assert same(hooks, one_step(tiny_model, tmp_path, "ghost", 6)[0], GHOST_TOL)
    clipped, unclipped = (torch.cat([u.flatten() for u in run]).norm() for run in (hooks, plain))
    assert clipped <= 1e-3 * (1 + 1e-4) < unclipped


def test_in_layer_gradients_clip_as_opacus_hooks_do(tiny_model, tmp_path):
    """With only LoRA B training, B's own backward (train/per_record.py) gives the records' gradients
    Opacus' hooks give: the same clipped update, whole and in slices, one accountant step. A second
    backward before the step is refused, and with A training too the mode falls back to hooks."""
    for microbatch in (6, 2):  # measured: equal to 1e-7 of the update whole, bit for bit in slices
        hooks, _ = one_step(tiny_model, tmp_path, "hooks", microbatch, freeze_a=True)
        in_layer, engine = one_step(tiny_model, tmp_path, "in_layer", microbatch, freeze_a=True)
        assert same(hooks, in_layer, 1e-6), microbatch
        assert [(rate, steps) for _, rate, steps in engine.accountant.history] == [(1 / 1, 1)]
    plain, _ = one_step(tiny_model, tmp_path, None, 6, freeze_a=True)
    clipped, unclipped = (torch.cat([u.flatten() for u in run]).norm() for run in (hooks, plain))
    assert clipped <= 1e-3 * (1 + 1e-4) < unclipped  # the clip did bind: the equality is not of raw gradients

    for freeze_a, expected in ((False, "hooks"), (True, "in_layer")):
        peft_model, tokenizer = peft_tiny(tiny_model)
        if freeze_a:
            dp.freeze_lora_a(peft_model)
        ids, labels, mask = load_split(write_split(tmp_path, 4, seed=3), tokenizer, 128)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)
        module, *_, used = dp.make_private(AnswerLoss(peft_model), torch.optim.SGD(params, lr=1.0), loader,
                                           privacy={**PRIVACY, "clipping": "in_layer"}, noise_multiplier=0.0,
                                           distributed=False)
        assert used == expected
    module(ids, labels, mask).backward()  # the in_layer module, as Opacus' hooks refuse the same
    with pytest.raises(ValueError, match="already set"):
        module(ids, labels, mask).backward()


@pytest.mark.parametrize("clipping", ["in_layer", "hooks"])
def test_under_bf16_autocast_records_are_clipped_in_float32(tiny_model, tmp_path, clipping):
    """bf16 autocast (training.matmul_dtype) rounds the frozen base's products, not the adapter's:
    the per-record gradients Opacus clips stay float32, so the clip bound the accountant assumes holds."""
    peft_model, tokenizer = peft_tiny(tiny_model)
    if clipping == "in_layer":
        dp.freeze_lora_a(peft_model)
    ids, labels, mask = load_split(write_split(tmp_path, 6, seed=3), tokenizer, 128)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=6)
    module, optimizer, *_, used = dp.make_private(AnswerLoss(peft_model), torch.optim.SGD(params, lr=1.0), loader,
                                                  privacy={**PRIVACY, "max_grad_norm": 1e-3, "clipping": clipping},
                                                  noise_multiplier=0.0, distributed=False)
    assert used == clipping
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = causal_lm(peft_model).get_decoder().layers[-1].self_attn.q_proj.base_layer
        assert base(torch.ones(1, base.in_features)).dtype == torch.bfloat16
        loss = module(ids, labels, mask)
    loss.backward()  # outside autocast, as train.steps.forward_backward does: Opacus' hooks run in the backward
    assert {p.grad_sample.dtype for p in params} == {torch.float32}
    per_record = torch.cat([p.grad_sample.flatten(1) for p in params], dim=1).norm(dim=1)
    optimizer.pre_step()  # clip and sum, as step() does (noise 0)
    summed = torch.cat([p.grad.flatten() for p in params]).norm()
    assert (per_record > 1e-3).all() and summed <= 6 * 1e-3 * (1 + 1e-6)
