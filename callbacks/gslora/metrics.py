"""Forgetting metrics (as defined by the GS-LoRA paper) and LoRA group statistics.

All accuracies are top-1 in percent over samples:

* ``acc_f``: classes forgotten by the current task (lower is better);
* ``acc_r``: retained classes that have training samples (higher is better);
* ``acc_o``: classes forgotten by earlier tasks (lower is better);
* ``acc_m``: retained classes without training samples ("missing", higher is better);
* ``drop = acc_f_before - acc_f`` and ``h = 2 drop acc_r / (drop + acc_r)``, the harmonic mean of forgetting
  and retention (``drop`` clipped at 0 inside ``h``); ``acc_f_before`` is measured at the start of the task.

A split without samples has accuracy ``None``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_plugins.callbacks.gslora.tasks import TaskView

SPLITS = ("forgotten", "retained", "old", "missing")
SPLIT_KEYS = {"forgotten": "acc_f", "retained": "acc_r", "old": "acc_o", "missing": "acc_m"}


class LabelledCorrect(Metric):
    """Collects ``(label, prediction correct?)`` per sample, so any class split's accuracy is exact under DDP."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.labels.append(labels.detach().long().flatten())
        self.correct.append((logits.detach().argmax(dim=-1) == labels).long().flatten())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        # after a distributed sync the list states are already concatenated tensors
        if isinstance(self.labels, list) and not self.labels:
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            return empty, empty
        return dim_zero_cat(self.labels), dim_zero_cat(self.correct)


def split_accuracies(labels: torch.Tensor, correct: torch.Tensor, view: TaskView) -> dict[str, Optional[float]]:
    """``{"acc_f", "acc_r", "acc_o", "acc_m"}`` in percent (``None`` for an empty split) plus sample counts."""
    labels, correct = labels.cpu(), correct.cpu()
    masks = {
        "forgotten": _isin(labels, view.forgotten),
        "old": _isin(labels, view.old),
        "missing": _isin(labels, view.missing - view.forgotten - view.old),
    }
    masks["retained"] = ~(masks["forgotten"] | masks["old"] | masks["missing"])
    out: dict[str, Optional[float]] = {}
    for split in SPLITS:
        mask = masks[split]
        count = int(mask.sum())
        out[SPLIT_KEYS[split]] = 100.0 * float(correct[mask].sum()) / count if count else None
        out[f"n_{split}"] = count
    return out


def _isin(labels: torch.Tensor, classes: frozenset[int]) -> torch.Tensor:
    if not classes:
        return torch.zeros_like(labels, dtype=torch.bool)
    return torch.isin(labels, torch.tensor(sorted(classes), dtype=labels.dtype))


def drop_and_h(
    acc_f: Optional[float], acc_r: Optional[float], acc_f_before: Optional[float]
) -> tuple[Optional[float], Optional[float]]:
    """``(drop, h)`` as in the paper; ``None`` when an input is unknown."""
    if acc_f is None or acc_r is None or acc_f_before is None:
        return None, None
    drop = acc_f_before - acc_f
    clipped = max(drop, 0.0)
    h = 0.0 if clipped + acc_r == 0 else 2.0 * clipped * acc_r / (clipped + acc_r)
    return drop, h


@torch.no_grad()
def group_norms(groups: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
    """The group-lasso norm ``sqrt(sum ||W||_F^2)`` of each group's LoRA tensors."""
    return {
        name: math.sqrt(sum(float(torch.linalg.vector_norm(w.float())) ** 2 for w in tensors))
        for name, tensors in groups.items()
    }


@torch.no_grad()
def update_norms(group_layers: dict[str, Sequence[nn.Module]]) -> dict[str, tuple[float, float]]:
    """Per group: ``(||scaling B A||_F, ||W||_F)`` over the group's layers (each layer counted once)."""
    out = {}
    for name, layers in group_layers.items():
        unique = list({id(layer): layer for layer in layers}.values())
        delta = math.sqrt(sum(float(torch.linalg.vector_norm(layer.delta_weight().float())) ** 2 for layer in unique))
        weight = math.sqrt(sum(float(torch.linalg.vector_norm(layer.weight.float())) ** 2 for layer in unique))
        out[name] = (delta, weight)
    return out


def zero_group_ratio(norms: dict[str, tuple[float, float]], threshold: float) -> float:
    """Share of groups that leave their weights (almost) unchanged: ``||scaling B A||_F <= threshold * ||W||_F``.

    The paper defines the ratio as #unselected / #groups but gives no threshold. The group-lasso norm itself never
    reaches 0 (``A`` starts random and only ``B`` starts at 0; there is no proximal step), so a group counts as
    unselected when the weight update it would merge is at most ``threshold`` (relative) of its frozen weights.
    """
    if not norms:
        return 0.0
    zero = sum(1 for delta, weight in norms.values() if delta <= threshold * weight)
    return zero / len(norms)


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared parameters counted once)."""
    params = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
