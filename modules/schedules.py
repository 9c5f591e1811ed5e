"""Learning-rate schedules shared by the modules."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    import lightning.pytorch as pl


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up from 0 to the base LR over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` x base."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def adamw_warmup_cosine(module: "pl.LightningModule", lr: float, weight_decay: float, warmup_fraction: float,
                        min_lr_ratio: float) -> dict[str, Any]:
    """``configure_optimizers`` result: AdamW over the trainable parameters (no weight decay on biases, norms,
    position and class tokens) with a per-step :func:`warmup_cosine` schedule over the whole fit."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(("pos_embed", "cls_token")) else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    total = max(1, int(module.trainer.estimated_stepping_batches))
    scheduler = warmup_cosine(optimizer, total, int(warmup_fraction * total), min_lr_ratio)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
