"""Matrix multiplies in bfloat16 for generation, where the hardware does them natively.

Decoding a small model on CPU is the linear layers: ~85% of a step is matmul. In float32 they are
slow twice over: every step reads all weights (4 bytes each), and small-row products run far below
the cores' peak, so 8 rows cost ~2x one row. With bfloat16 weights on a CPU that multiplies bf16
natively (AVX512-BF16 or AMX), one step reads half the bytes and 8 rows cost about what one row
does: measured on SmolLM2-135M on 2 CPUs, 30 -> 41 tokens/s at batch 1 and 118 -> 215 at batch 8
(tests/bench/bench_flywheel.py). Only the weights and the products change precision: inputs are
rounded to bf16 at each linear layer and its output comes back in float32, so the residual stream,
norms, attention and softmax stay float32. Adapters are merged in float32 before the conversion.
On the demo's fine-tuned candidate the 60-example function-name and argument accuracy were the same
either way (0.90 / 0.85); greedy outputs can differ where two tokens are nearly tied.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal

import torch

from ray_app.config import MatmulDtype, native_bf16_override


class Bf16Linear(torch.nn.Module):
    """A linear layer that keeps a bfloat16 copy of its weight and answers in its input's dtype."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = (None if linear.bias is None
                     else torch.nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bfloat16 natively (elsewhere bf16 is emulated, and slower).

    FLYWHEEL_NATIVE_BF16 "0" or "1" answers in place of the CPU's flags (ray_app.config.native_bf16_override),
    so one machine can run both paths: "0" keeps every "auto" matmul_dtype in float32 on a CPU with
    AVX512-BF16 or AMX, "1" takes bf16 where the CPU would emulate it (the same arithmetic, slower).
    """
    override = native_bf16_override()
    if override is not None:
        return override
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve(matmul_dtype: MatmulDtype) -> Literal["float32", "bfloat16"]:
    """"auto" -> bfloat16 where the CPU multiplies it natively, else float32."""
    if matmul_dtype == "auto":
        return "bfloat16" if native_bf16() else "float32"
    return matmul_dtype


def training_autocast(device_type: str, matmul_dtype: MatmulDtype = "auto") -> Any:
    """The autocast context for training steps: bfloat16 products on CUDA, and on CPUs that
    multiply bf16 natively when `matmul_dtype` resolves to it; otherwise no autocast (float32)."""
    if matmul_dtype == "float32" or (device_type == "cpu" and resolve(matmul_dtype) == "float32"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def for_generation(model: Any, matmul_dtype: MatmulDtype = "auto") -> Any:
    """`model` with every plain float32 linear layer multiplying in bfloat16 when `matmul_dtype`
    resolves to it. Changed in place and returned; for inference only."""
    if resolve(matmul_dtype) == "float32":
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32:
                setattr(module, name, Bf16Linear(child))
    return model
