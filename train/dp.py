"""DP-LoRA: differentially private fine-tuning of the LoRA weights with Opacus.

Only the adapter is trained, so only its per-example gradients are computed and clipped
(the frozen base has requires_grad False and Opacus skips it). Batches are drawn by
Poisson sampling (each example joins a batch with probability `sample_rate`), which is
what the RDP accountant's guarantee assumes; the noise multiplier is solved for
`privacy.target_epsilon` at `privacy.delta` over the planned epochs.
"""
from __future__ import annotations

from typing import Any

import torch


def make_private(model: Any, optimizer: torch.optim.Optimizer, loader: torch.utils.data.DataLoader, *,
                 privacy: dict[str, Any], epochs: int) -> tuple[Any, Any, Any, Any]:
    """(private model, DP optimizer, Poisson loader, engine) for `target_epsilon` over `epochs`."""
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=privacy["target_epsilon"],
        target_delta=privacy["delta"], epochs=epochs, max_grad_norm=privacy["max_grad_norm"],
        poisson_sampling=True)
    return model, optimizer, loader, engine


def privacy_spent(engine: Any, privacy: dict[str, Any]) -> dict[str, Any]:
    """The report's `training` privacy fields; epsilon is None when training was not private."""
    if engine is None:
        return {"epsilon": None, "delta": None, "noise_multiplier": None, "sample_rate": None}
    history = engine.accountant.history  # [(noise_multiplier, sample_rate, steps)]
    noise, rate, _ = history[-1] if history else (None, None, 0)
    return {"epsilon": engine.get_epsilon(privacy["delta"]), "delta": privacy["delta"],
            "noise_multiplier": noise, "sample_rate": rate}
