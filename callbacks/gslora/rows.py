"""The rows of :class:`~.callback.GSLoRA`'s history: split metrics with Drop and H against the values before the
task, the LoRA groups' statistics and the test split's columns."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning.pytorch as pl
from torch import nn

from lightning_plugins.callbacks.gslora.lora import LoRALinear
from lightning_plugins.callbacks.gslora.metrics import (
    drop_and_h,
    group_norms,
    parameter_counts,
    update_norms,
    zero_group_ratio,
)
from lightning_plugins.callbacks.gslora.tasks import TaskView


def history_row(kind: str, stage: str, task_view: TaskView, trainer: pl.Trainer, accuracies: dict, before: dict,
                keys: Sequence[str]) -> dict[str, Any]:
    """A row of ``accuracies`` (metric ``keys``: forgotten, retained, ...), with Drop, H and the values ``before``."""
    drop, h = drop_and_h(accuracies.get(keys[0]), accuracies.get(keys[1]), before.get(keys[0]))
    return {
        "task": task_view.index, "kind": kind, "stage": stage,
        "forgotten": sorted(task_view.forgotten), "epoch": trainer.current_epoch, "step": trainer.global_step,
        **accuracies, "drop": drop, "h": h,
        **{f"{key}_before": before.get(key) for key in keys},
    }


def group_stats(groups: dict[str, list[nn.Parameter]], layers: dict[str, list[LoRALinear]],
                module: Optional[nn.Module], zero_group_threshold: float) -> dict[str, Any]:
    """Zero-group ratio, trainable parameters and each group's LoRA norm and relative update norm."""
    norms = group_norms(groups)
    updates = update_norms(layers)
    trainable, total = parameter_counts(module) if module is not None else (0, 0)
    stats: dict[str, Any] = {
        "zero_group_ratio": zero_group_ratio(updates, zero_group_threshold),
        "trainable_params": trainable, "total_params": total,
        "trainable_ratio": trainable / total if total else None,
    }
    stats.update({f"group_norm/{name}": value for name, value in norms.items()})
    stats.update({f"update_norm/{name}": delta / weight if weight else None
                  for name, (delta, weight) in updates.items()})
    return stats


def test_columns(after: dict, before: dict, keys: Sequence[str]) -> dict[str, Any]:
    """A task row's test-split columns: the metrics ``after`` the task, those ``before`` it, Drop and H."""
    drop, h = drop_and_h(after.get(keys[0]), after.get(keys[1]), before.get(keys[0]))
    columns = {f"test_{k}": v for k, v in after.items()}
    columns.update({f"test_{k}_before": before.get(k) for k in keys})
    columns.update({"test_drop": drop, "test_h": h})
    return columns
