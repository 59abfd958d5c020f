"""DP-LoRA: differentially private fine-tuning of the LoRA weights with Opacus.

Only the adapter is trained, so only its per-example gradients are computed and clipped
(the frozen base has requires_grad False and Opacus skips it). Batches are drawn by
Poisson sampling (each example joins a batch with probability `sample_rate`), which is
what the RDP accountant's guarantee assumes; the noise multiplier is solved for
`privacy.target_epsilon` at `privacy.delta` over the planned steps (the epochs, capped by
training.max_steps).

Across workers the module is wrapped in Opacus' `DifferentiallyPrivateDistributedDataParallel`:
each worker Poisson-samples its shard, clips its own examples, and the optimizer sums the
clipped gradients over workers before one worker's worth of noise is added, so the
guarantee is the one of a single worker with the global batch.

Clipping runs in one of three modes (privacy.clipping): `in_layer` (the default) and `hooks`
materialize each record's adapter gradient, in the LoRA B layers' own backward
(train/per_record.py; when B is all that trains) or from Opacus' module hooks; `ghost` gets
each record's gradient norm from activations and output gradients and applies the clipping in
a second backward pass, so no per-record gradient is stored (Opacus falls back to per-record
gradients for layer types it has no ghost norm for).

Before anything trains, two checks that turn stack traces into sentences: `check_module`
names the layers Opacus cannot clip per example (its ModuleValidator), and
`refuse_hopeless` refuses an epsilon so small that the noise would drown the gradient,
naming the noise multiplier it would need.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from ray_app.config import PrivacyConfig
from ray_app.errors import JobFailed
from ray_app.privacy import planned_mechanism, planned_steps


class PrivacyUnattainable(JobFailed):
    reason = "privacy_unattainable"


class ModelNotPrivatizable(JobFailed):
    reason = "model_not_privatizable"


def check_module(model: torch.nn.Module) -> None:
    """Raise ModelNotPrivatizable naming every module Opacus' ModuleValidator rejects."""
    from opacus.validators import ModuleValidator

    was_training = model.training
    model.train()  # the validator also insists on training mode, which says nothing about the layers
    errors = ModuleValidator.validate(model, strict=False)
    model.train(was_training)
    if errors:
        names = "; ".join(str(e).strip().splitlines()[0][:160] for e in errors[:5])
        raise ModelNotPrivatizable(f"DP training cannot handle {len(errors)} module(s) of this model: {names} "
                                   "(Opacus ModuleValidator; set training.privacy.enabled false to compare "
                                   "without DP, or pick another model)")


def refuse_hopeless(privacy: PrivacyConfig, *, num_examples: int, batch_size: int, epochs: int,
                    max_steps: int | None) -> float:
    """The planned noise multiplier, or PrivacyUnattainable when the noise would drown the gradient.

    Each step adds Gaussian noise of std noise_multiplier x clip norm to every coordinate of the
    summed clipped gradient, whose whole signal is at most batch_size x clip norm. Once
    noise_multiplier / batch_size passes privacy.max_noise_ratio, even one coordinate's noise
    is a large part of everything the batch can say: the loss does not move.
    """
    plan = {"num_examples": num_examples, "batch_size": batch_size, "epochs": epochs, "max_steps": max_steps}
    try:
        noise, rate, steps = planned_mechanism(**plan, target_epsilon=privacy.target_epsilon,
                                               delta=privacy.delta)
    except ValueError:  # past the default RDP orders' reach: solve again with orders that go further
        noise, rate, steps = _far_mechanism(privacy, **plan)
    expected_batch = rate * num_examples
    ratio, limit = noise / expected_batch, privacy.max_noise_ratio
    if ratio > limit:
        raise PrivacyUnattainable(
            f"target_epsilon {privacy.target_epsilon} needs noise_multiplier {noise:.2f} for {num_examples} "
            f"examples (batch {expected_batch:.0f}, {steps} steps at sample rate {rate:.3f}): "
            f"noise {ratio:.2f} x the clipping norm on the mean gradient, above privacy.max_noise_ratio {limit}, "
            "so the loss could not move. Raise target_epsilon, collect more records or raise training.batch_size")
    return noise


def _far_mechanism(privacy: PrivacyConfig, **plan: Any) -> tuple:
    from opacus.accountants.utils import get_noise_multiplier

    rate, steps = planned_steps(**plan)
    try:
        noise = get_noise_multiplier(target_epsilon=privacy.target_epsilon, target_delta=privacy.delta,
                                     sample_rate=rate, steps=steps, accountant="rdp",
                                     alphas=[1.5, 2, 4, 8, 16, 32, 64] + list(range(128, 20_000, 128)))
    except ValueError as exc:
        raise PrivacyUnattainable(f"target_epsilon {privacy.target_epsilon} is out of any noise's reach for "
                                  f"{plan['num_examples']} examples ({exc})") from exc
    return float(noise), rate, steps


class Wrapped(NamedTuple):
    """What the step loop drives: made private here (`make_private`) or plain data-parallel (train/lora.py)."""

    module: Any
    optimizer: Any
    loader: Any
    engine: Any
    criterion: Callable[[torch.Tensor], Any] | None  # ghost: the module's per-record losses -> Opacus' loss
    clipping: str | None  # None: not private


class PerRecord:
    """Ghost clipping's criterion: the module already returns each record's loss; Opacus asks for
    them unreduced (`reduction` none) to weight its second backward pass by the clipping factors."""

    reduction = "mean"

    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        if self.reduction == "none":
            return losses
        return losses.sum() if self.reduction == "sum" else losses.mean()


def freeze_lora_a(peft_model: torch.nn.Module) -> None:
    """Train B only (FFA-LoRA): A stays as the public warm-up left it, so DP's noise spreads over
    B's numbers alone while a record's clipped signal keeps its bound."""
    for name, parameter in peft_model.named_parameters():
        if ".lora_A." in name:
            parameter.requires_grad_(False)


def make_private(module: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: torch.utils.data.DataLoader, *,
                 privacy: PrivacyConfig, noise_multiplier: float, distributed: bool) -> Wrapped:
    """The private module, DP optimizer, Poisson loader and engine at `noise_multiplier` (solved
    by `refuse_hopeless` for target_epsilon over the planned steps).

    `loader.batch_size` is the global expected batch: with `distributed` each worker draws its
    shard's share of it. `privacy.clipping`: "in_layer" computes the records' gradients in the
    LoRA B layers' backward (train/per_record.py) when B is all that trains, else falls back to
    "hooks"; "ghost" switches `module` (an AnswerLoss) to per-record losses and returns the
    criterion that turns them into Opacus' two-pass loss. The returned `clipping` is the mode run.
    """
    from opacus import PrivacyEngine
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    from train.per_record import b_linears

    engine = PrivacyEngine(accountant="rdp")
    clipping = privacy.clipping
    linears = b_linears(module) if clipping == "in_layer" else None
    if clipping == "in_layer" and linears is None:
        clipping = "hooks"  # A or other weights train too: Opacus' hooks cover every layer type
    adapters_in_float32(module, per_record=linears or ())
    extra = {"ghost": {"grad_sample_mode": "ghost", "criterion": PerRecord()},
             "in_layer": {"grad_sample_mode": "no_op"}}.get(clipping, {})
    module.per_record = clipping == "ghost"
    wrapped = engine.make_private(
        module=DPDDP(module) if distributed else module, optimizer=optimizer, data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=privacy.max_grad_norm, poisson_sampling=True, **extra)
    if clipping == "ghost":
        private, optimizer, criterion, loader = wrapped
        return Wrapped(private, optimizer, loader, engine, criterion, clipping)
    private, optimizer, loader = wrapped
    return Wrapped(private, optimizer, loader, engine, None, clipping)


def adapters_in_float32(module: torch.nn.Module, *, per_record: Sequence[torch.nn.Linear] = ()) -> None:
    """The adapter's own products in float32, even under bf16 autocast (train/lora.py).

    Opacus computes a record's gradient in its layer's dtype. From bf16 products (3 significant
    digits) a clipped record's norm could exceed max_grad_norm by ~0.4%, more than the accountant
    assumes; in float32 the clip holds. The adapter is rank 1-2, so float32 costs nothing: the
    frozen base, where the time goes, keeps its bf16 products. The linears in `per_record`
    (in_layer clipping) run `PerRecordLinear`, whose backward also leaves each record's gradient.
    """
    from peft.tuners.lora import LoraLayer

    from train.per_record import PerRecordLinear

    in_layer = {id(linear) for linear in per_record}
    for layer in module.modules():
        if isinstance(layer, LoraLayer):
            for linear in (*layer.lora_A.values(), *layer.lora_B.values()):
                product = PerRecordLinear.apply if id(linear) in in_layer else torch.nn.functional.linear
                linear.forward = functools.partial(_float32_linear, linear, product)


def _float32_linear(linear: torch.nn.Linear, product: Callable, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return product(x.float(), linear.weight, linear.bias)


def noise_only_grads(optimizer: Any) -> None:
    """An empty Poisson batch still takes its step (the accountant counts it): zero clipped
    gradients, so the optimizer adds noise alone. Empty per-example gradients say so."""
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # hooks: per-record grads
        p.grad = torch.zeros_like(p)  # ghost: the already clipped sum


def privacy_spent(engine: Any, privacy: PrivacyConfig) -> dict[str, Any]:
    """The report's `training` privacy fields; epsilon is None when training was not private."""
    if engine is None:
        return {"epsilon": None, "delta": None, "noise_multiplier": None, "sample_rate": None}
    history = engine.accountant.history  # [(noise_multiplier, sample_rate, steps)]
    noise, rate, _ = history[-1] if history else (None, None, 0)
    return {"epsilon": engine.get_epsilon(privacy.delta), "delta": privacy.delta,
            "noise_multiplier": noise, "sample_rate": rate}
