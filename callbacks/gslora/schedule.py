"""The learning-rate schedule of :class:`~.callback.GSLoRA`'s AdamW (cosine, then ``early_stop``'s cool-down) and
the check that a module's own optimizer holds the LoRA tensors."""

from __future__ import annotations

import math
from typing import Callable, Optional

import lightning.pytorch as pl

from lightning_plugins.callbacks.gslora.lora import LoRALinear


def cosine(total: float, floor: float) -> Optional[Callable[[int], float]]:
    """The factor of a cosine from 1 to ``floor`` over ``total`` steps; ``None`` when ``total`` is unknown."""
    if not math.isfinite(total) or total < 1:
        return None

    def planned(step: int) -> float:
        progress = min(step, total) / total
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return planned


def constant(step: int) -> float:
    """A constant factor, for an unknown number of steps."""
    return 1.0


def with_cooldown(planned: Callable[[int], float], floor: float,
                  cooldown_of: Callable[[], Optional[dict[str, int]]]) -> Callable[[int], float]:
    """``planned``, until a cool-down (``cooldown_of()``: its first step and length) anneals it to ``floor``."""

    def schedule(step: int) -> float:
        cooldown = cooldown_of()
        if cooldown is None or step < cooldown["start"]:
            return planned(step)
        # early_stop's cool-down: cosine from the planned factor where the rule held down to min_lr, reached
        # at the cool-down's last step
        progress = min(1.0, (step - cooldown["start"] + 1) / max(1, cooldown["steps"]))
        start = planned(cooldown["start"])
        return floor + (start - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return schedule


def check_optimizer(trainer: pl.Trainer, adapters: dict[str, LoRALinear], module_name: str) -> None:
    """Raise if the Trainer's optimizers leave out an adapter's LoRA tensors."""
    in_optimizer = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
    left_out = [name for name, a in adapters.items()
                if id(a.lora_A) not in in_optimizer or id(a.lora_B) not in in_optimizer]
    if left_out:
        raise RuntimeError(
            f"the optimizer from {module_name}.configure_optimizers does not hold the LoRA "
            f"tensors of {left_out[:3]}{'...' if len(left_out) > 3 else ''}; build it from the parameters with "
            "requires_grad=True after setup, or pass GSLoRA(lr=...) to let the callback build it"
        )
