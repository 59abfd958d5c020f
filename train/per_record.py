"""Each record's gradient of the LoRA B weights, computed in the layer's own backward.

DP-SGD clips every record's gradient, so it needs them one by one. Opacus' `hooks` mode gets
them from module hooks: a forward hook keeps each layer's input, a backward hook takes the
output gradient and multiplies the two. Per pass that is Python work in every hooked layer; on
a GPU, where a LoRA step is a few milliseconds of small kernels, it was ~20% of the step (the
CPU stand-in measured once: 18.0 ms a step against 14.9 ms non-private).

When the only trainable weights are the LoRA B matrices (lora.freeze_a, DP's default), the same
product can run inside the layer's autograd function instead: B's backward already holds its
input x and output gradient g, and a record's gradient is sum over tokens of g x^T. The result
goes where Opacus' hooks would put it (`weight.grad_sample`), and Opacus' DPOptimizer clips,
sums, noises and accounts for it unchanged (`grad_sample_mode="no_op"`, its mode for per-record
gradients computed outside it). 15.5 ms on the same stand-in.

The equality with Opacus' hooks (at noise 0, whole and sliced) is tests/test_dp_clipping.py's.
"""
from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer


def b_linears(module: torch.nn.Module) -> list[torch.nn.Linear] | None:
    """The LoRA B linears, when they hold every trainable weight of `module` (and have no bias);
    None when anything else trains, which leaves the per-record gradients to Opacus' hooks."""
    linears = [linear for layer in module.modules() if isinstance(layer, LoraLayer)
               for linear in layer.lora_B.values() if linear.weight.requires_grad]
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    if not linears or any(linear.bias is not None for linear in linears):
        return None
    return linears if {id(linear.weight) for linear in linears} == trainable else None


class PerRecordLinear(torch.autograd.Function):
    """y = x W^T whose backward sets W.grad_sample (records x out x in) in place of W.grad.

    It runs in float32 outside autocast, as every adapter product does under DP (train/dp.py
    `adapters_in_float32`), and takes the linear's bias only to share `F.linear`'s signature: the
    linears it runs for have none (`b_linears`).

    The loss is the batch's mean of its records' losses (train/tail.py AnswerLoss), so the output
    gradient carries a factor 1/n; times n, each slice is that record's own gradient, as Opacus'
    hooks scale it for loss_reduction "mean".
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: None) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.weight = weight  # the Parameter itself: its grad_sample is what the DP optimizer reads
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (x,), weight = ctx.saved_tensors, ctx.weight
        if getattr(weight, "grad_sample", None) is not None:
            # as Opacus' hooks do under Poisson sampling: a second backward before the optimizer's
            # step (or its skipped step, train/steps.py) would mix two batches' records
            raise ValueError("per-record gradients of this step are already set; call the DP optimizer's "
                             "step() (or zero_grad()) between backward passes")
        weight.grad_sample = torch.einsum("n...o,n...i->noi", grad_out, x) * len(x)
        return grad_out @ weight, None, None
