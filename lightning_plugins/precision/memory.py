"""A callback that measures the persistent training state (weights, gradients, optimizer state) per parameter."""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from torch.optim import Optimizer

from lightning_plugins.fp8 import training_state_bytes

__all__ = ["TrainingStateMeter"]


class TrainingStateMeter(Callback):
    """Bytes per parameter of the training state, taken once, just before an optimizer step of the run.

    At that moment weights, gradients (``.grad`` and FP8 side-channel gradients) and the optimizer state (which exists
    from the second step on) are all alive, so the figure is what training holds, for any precision: ``32-true``
    gives 16 B/param with Adam; ``fp8-msamp`` O2 about 6-7 for FP8 layers. The result is in :attr:`measured`
    (see :func:`lightning_plugins.fp8.training_state_bytes`).

    Args:
        at_step: the optimizer step (0-based) to measure at; must be >= 1 so that Adam's state exists.
    """

    def __init__(self, at_step: int = 1) -> None:
        if isinstance(at_step, bool) or not isinstance(at_step, int) or at_step < 1:
            raise ValueError(f"at_step must be an integer >= 1 (Adam's state exists after step 0), got {at_step!r}")
        self.at_step = at_step
        self.measured: Optional[dict[str, Any]] = None

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if self.measured is None and trainer.global_step >= self.at_step:
            self.measured = training_state_bytes(pl_module.parameters(), optimizer)
