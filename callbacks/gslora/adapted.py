"""The announcement of the layers a :class:`~.callback.GSLoRA` task adapts: a rank-zero log line,
``adapted_layers.csv`` and a summary for the Lightning loggers."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_plugins.callbacks.gslora import report
from lightning_plugins.callbacks.gslora.lora import LoRALinear, TargetLayer
from lightning_plugins.callbacks.gslora.metrics import parameter_counts


def adapter_rows(task: int, layers: list[TargetLayer], adapters: dict[str, LoRALinear],
                 groups: dict[str, list[nn.Parameter]]) -> list[dict[str, Any]]:
    """One row per adapted layer: its group, type, shape, weight dtype, rank and LoRA parameter count."""
    group_of = {id(p): name for name, params in groups.items() for p in params}
    rows = []
    for layer in layers:
        adapter = adapters[layer.name]
        base = adapter.base_layer
        rows.append({
            "task": task, "layer": layer.name, "group": group_of.get(id(adapter.lora_A), layer.block),
            "type": type(base).__name__, "in_features": adapter.in_features,
            "out_features": adapter.out_features, "weight_dtype": str(base.weight.dtype).replace("torch.", ""),
            "rank": adapter.rank, "lora_params": adapter.lora_A.numel() + adapter.lora_B.numel(),
        })
    return rows


def announce_adapters(trainer: pl.Trainer, pl_module: pl.LightningModule, rows: list[dict[str, Any]], task: int,
                      rank: int, grouping: str, output_dir: str) -> None:
    """Log the adapted layers by group (rank zero), write ``adapted_layers.csv`` (global rank 0) and give the
    loggers the counts and the trainable ratio (``log_hyperparams``)."""
    trainable, total = parameter_counts(pl_module)
    lora_params = sum(row["lora_params"] for row in rows)
    ratio = trainable / total if total else 0.0
    by_group: dict[str, list[str]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row["layer"])
    kinds = sorted({row["type"] for row in rows})
    rank_zero_info(
        f"GSLoRA task {task}: LoRA rank {rank} on {len(rows)} {'/'.join(kinds)} layers in "
        f"{len(by_group)} groups (grouping={grouping!r}); trainable {trainable:,} of {total:,} parameters "
        f"({100 * ratio:.2f} %): " + "; ".join(f"{g}: {', '.join(names)}" for g, names in by_group.items())
    )
    if trainer.is_global_zero:
        report.write_adapted_layers(rows, output_dir)
    summary = {"gslora/adapted_layers": len(rows), "gslora/groups": len(by_group), "gslora/rank": rank,
               "gslora/lora_params": lora_params, "gslora/trainable_params": trainable,
               "gslora/trainable_ratio": ratio}
    for logger in trainer.loggers:
        logger.log_hyperparams(summary)
