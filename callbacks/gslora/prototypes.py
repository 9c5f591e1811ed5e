"""GS-LoRA++ class prototypes: the mean embedding of each class over the task's training data, and the lookup of
each sample's prototype for the prototype loss (:func:`~lightning_plugins.callbacks.gslora.losses.prototype_loss`).

Module protocol: ``embed(x) -> [B, d]``, the features the prototypes are built from (classification modules).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_plugins.callbacks.gslora.evaluation import unpack


def embed(pl_module: pl.LightningModule, inputs: Any) -> torch.Tensor:
    """``pl_module.embed(inputs)``, checked to be ``[batch, d]``."""
    embeddings = pl_module.embed(inputs)
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
        shape = list(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(
            f"{type(pl_module).__name__}.embed(x) must return features of shape [batch, d]; got {shape}"
        )
    return embeddings


def with_prototypes(embeddings: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor,
                    values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of the samples whose class has a prototype, and those prototypes."""
    classes = classes.to(labels.device)
    values = values.to(embeddings.device)
    match = labels.unsqueeze(1) == classes.unsqueeze(0)
    has = match.any(dim=1)
    return embeddings[has], values[match[has].float().argmax(dim=1)]


@torch.no_grad()
def class_prototypes(trainer: pl.Trainer, pl_module: pl.LightningModule,
                     loaders: list) -> tuple[torch.Tensor, torch.Tensor]:
    """``(classes [K], prototypes [K, d])``: the mean ``embed`` of every class over one pass of ``loaders`` (dict
    batches contribute each of their parts), the module in eval mode; summed over processes under DDP."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    was_training = pl_module.training
    pl_module.eval()
    try:
        with trainer.precision_plugin.forward_context():
            for loader in loaders:
                for batch in loader:
                    parts = batch.values() if isinstance(batch, Mapping) else [batch]
                    for part in parts:
                        inputs, labels = unpack(trainer.strategy.batch_to_device(part, pl_module.device),
                                                "prototype")
                        embeddings = embed(pl_module, inputs).float()
                        for label in labels.unique().tolist():
                            rows = embeddings[labels == label]
                            sums[label] = sums.get(label, 0) + rows.sum(dim=0)
                            counts[label] = counts.get(label, 0) + rows.shape[0]
    finally:
        pl_module.train(was_training)
    if trainer.world_size > 1:
        sums, counts = all_reduce_class_sums(trainer, sums, counts)
    if not sums:
        raise RuntimeError("GSLoRA++ found no training samples to build class prototypes from")
    classes = sorted(sums)
    return torch.tensor(classes, dtype=torch.long), torch.stack([sums[c] / counts[c] for c in classes]).cpu()


def all_reduce_class_sums(trainer: pl.Trainer, sums: dict[int, torch.Tensor],
                          counts: dict[int, int]) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
    """Per-class embedding sums and counts summed over the processes."""
    device = trainer.strategy.root_device
    local_max = torch.tensor(max(sums) if sums else -1, device=device)
    num = int(trainer.strategy.reduce(local_max, reduce_op="max")) + 1
    dim = torch.tensor(next(iter(sums.values())).shape[0] if sums else 0, device=device)
    dim = int(trainer.strategy.reduce(dim, reduce_op="max"))
    total = torch.zeros(num, dim, device=device)
    number = torch.zeros(num, device=device)
    for label, value in sums.items():
        total[label] = value.to(device)
        number[label] = counts[label]
    total = trainer.strategy.reduce(total, reduce_op="sum")
    number = trainer.strategy.reduce(number, reduce_op="sum")
    present = (number > 0).nonzero().flatten().tolist()
    return {c: total[c] for c in present}, {c: int(number[c]) for c in present}
