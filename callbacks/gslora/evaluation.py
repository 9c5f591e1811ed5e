"""Forgetting evaluation: batch unpacking, the loaders a split is measured on, and one full pass of a
:class:`~lightning_plugins.callbacks.gslora.objectives.TaskObjective`'s split metric over them.

The callback measures the split metrics (Acc_f/Acc_r/Acc_o/Acc_m for classification, AP_f/AP_r/AP_o for
detection) before each task, at every validation while forgetting, and after the merge; this module holds the
parts of that which do not depend on the callback's state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader

from lightning_plugins.callbacks.gslora.tasks import TaskView


@torch.no_grad()
def evaluate_split_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule, objective: Any, loaders: list,
                           task_view: TaskView) -> dict:
    """One pass of ``objective``'s split metric over ``loaders`` (the module in eval mode, under the precision
    plugin's forward context); returns ``objective.compute_metric(...)``."""
    metric = objective.new_metric().to(pl_module.device)
    was_training = pl_module.training
    pl_module.eval()
    try:
        with trainer.precision_plugin.forward_context():
            for loader in loaders:
                for batch in loader:
                    on_device = trainer.strategy.batch_to_device(batch, pl_module.device)
                    objective.update_metric(metric, pl_module, on_device)
    finally:
        pl_module.train(was_training)
    return objective.compute_metric(metric, task_view)


def unpack(batch: Any, what: str) -> tuple[Any, torch.Tensor]:
    """``(inputs, labels)`` of a classification batch ``(x, y)`` with integer labels ``[batch]``."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
        labels = batch[1]
        if labels.ndim == 1 and not labels.is_floating_point():
            return batch[0], labels.long()
    raise TypeError(
        f"GSLoRA needs {what} batches (x, y) with integer class labels y of shape [batch]; got "
        f"{describe(batch)}"
    )


def describe(batch: Any) -> str:
    """A short description of a batch's structure, for error messages."""
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {list(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a dict with keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        parts = [f"tensor{list(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__ for b in batch]
        return f"a {type(batch).__name__} ({', '.join(parts)})"
    return f"a {type(batch).__name__}"


def check_retain_forget(batch: Mapping) -> None:
    """Raise ``TypeError`` unless a dict training batch has exactly the keys ``retain`` and ``forget``."""
    if set(batch) != {"retain", "forget"}:
        raise TypeError(
            f"GSLoRA training batches that are dicts must have exactly the keys 'retain' and 'forget'; got "
            f"{sorted(map(str, batch))}"
        )


def split_training_batch(batch: Any, task_view: TaskView) -> tuple[Any, torch.Tensor, Any, torch.Tensor]:
    """``(x_retain, y_retain, x_forget, y_forget)`` from a ``{"retain", "forget"}`` or an ``(x, y)`` batch."""
    if isinstance(batch, Mapping):
        check_retain_forget(batch)
        x_r, y_r = unpack(batch["retain"], "retain")
        x_f, y_f = unpack(batch["forget"], "forget")
        return x_r, y_r, x_f, y_f
    inputs, labels = unpack(batch, "training")
    forgotten = task_view.forgotten | task_view.old
    mask = torch.isin(labels, torch.tensor(sorted(forgotten), device=labels.device, dtype=labels.dtype))
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"GSLoRA splits (x, y) batches by label and needs x to be a tensor; got {describe(inputs)}")
    return inputs[~mask], labels[~mask], inputs[mask], labels[mask]


def flatten_loaders(loaders: Any) -> list:
    """The individual dataloaders of a loader, a ``CombinedLoader``, or a dict/list of them."""
    if loaders is None:
        return []
    if isinstance(loaders, CombinedLoader):
        return list(loaders.flattened)
    if isinstance(loaders, Mapping):
        return [dl for value in loaders.values() for dl in flatten_loaders(value)]
    if isinstance(loaders, (list, tuple)):
        return [dl for value in loaders for dl in flatten_loaders(value)]
    return [loaders]


def loggable(row: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a history row (what is logged under ``gslora/...``)."""
    skip = {"task", "kind", "stage", "forgotten", "epoch", "step"}
    return {k: v for k, v in row.items()
            if k not in skip and not k.startswith("n_") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def first_present(*values: Optional[float]) -> Optional[float]:
    for value in values:
        if value is not None:
            return value
    return None
