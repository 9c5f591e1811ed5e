"""The parts of :class:`~.callback.GSLoRA`'s ``early_stop`` rule: the epoch's forgetting loss, its saturation, the
forgotten threshold, the cool-down length and why a task's training ended."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch


def epoch_mean(trainer: pl.Trainer, forget_sum: Optional[torch.Tensor], forget_steps: int) -> Optional[float]:
    """The forgetting term's mean over the epoch's training steps of all processes (``None`` without any)."""
    totals = torch.tensor([float(forget_sum) if forget_sum is not None else 0.0, float(forget_steps)],
                          device=trainer.strategy.root_device)
    totals = trainer.strategy.reduce(totals, reduce_op="sum")
    steps = float(totals[1])
    return float(totals[0]) / steps if steps else None


def saturation(term: float, previous: Optional[float], bound: Optional[float], stop_saturation: float,
               stop_plateau: float) -> tuple[Optional[str], str]:
    """``("bound"|"plateau", why)`` when the forgetting loss is at the bound or flat, else ``(None, "")``."""
    if bound is not None and term <= stop_saturation * bound:
        return "bound", f"at the bound ({term:.4g} <= stop_saturation {stop_saturation:g} x bound {bound:g})"
    if stop_plateau > 0 and previous is not None and previous > 0 and previous - term < stop_plateau * previous:
        return "plateau", (f"flat ({previous:.4g} -> {term:.4g}, less than stop_plateau {stop_plateau:g} lower; "
                           + (f"bound {bound:g})" if bound is not None else "no bound)"))
    return None, ""


def forget_threshold(objective_name: str, key: str, stop_forget_acc: float, stop_forget_ap: Optional[float],
                     before: Optional[float]) -> tuple[float, str]:
    """The forgotten split's metric ``key`` at or below which the task counts as forgotten, and its name."""
    if objective_name == "classification" or key == "acc_f":
        return stop_forget_acc, "stop_forget_acc"
    if stop_forget_ap is not None:
        return stop_forget_ap, "stop_forget_ap"
    return (0.1 * before if before is not None else 0.0), "10 % of the value before the task"


def cooldown_epochs(trainer: pl.Trainer, epoch: int, stop_cooldown: int) -> int:
    """The cool-down epochs after ``epoch``: ``stop_cooldown``, never past the Trainer's ``max_epochs``."""
    max_epochs = trainer.max_epochs
    left = max_epochs - 1 - epoch if max_epochs is not None and max_epochs >= 0 else stop_cooldown
    return max(0, min(stop_cooldown, left))


def stopped_by(trainer: pl.Trainer, stop: Optional[dict[str, Any]]) -> str:
    """Why the task's training ended: ``early_stop``, ``max_epochs``, ``max_steps`` or ``other``."""
    if stop is not None:
        return "early_stop"
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch >= max_epochs:
        return "max_epochs"
    if trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps:
        return "max_steps"
    return "other"
