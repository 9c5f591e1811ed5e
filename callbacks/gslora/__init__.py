"""GS-LoRA / GS-LoRA++ continual forgetting: LoRA injection, losses, task objectives (classification, detection),
data, metrics, the callback, reports."""

from lightning_plugins.callbacks.gslora.callback import GSLoRA
from lightning_plugins.callbacks.gslora.data import ForgettingDataModule, SeededRandomSampler, select_task_samples
from lightning_plugins.callbacks.gslora.detection_data import (
    DetectionForgettingDataModule,
    detection_collate,
    select_detection_samples,
)
from lightning_plugins.callbacks.gslora.lora import (
    DEFAULT_TARGETS,
    LoRALinear,
    find_target_layers,
    inject_lora,
    remove_lora,
)
from lightning_plugins.callbacks.gslora.objectives import (
    ClassificationObjective,
    DetectionObjective,
    TaskObjective,
)
from lightning_plugins.callbacks.gslora.report import format_table, plot_history, write_history
from lightning_plugins.callbacks.gslora.sequence import forget_sequence

__all__ = [
    "DEFAULT_TARGETS",
    "ClassificationObjective",
    "DetectionForgettingDataModule",
    "DetectionObjective",
    "ForgettingDataModule",
    "GSLoRA",
    "LoRALinear",
    "SeededRandomSampler",
    "TaskObjective",
    "detection_collate",
    "find_target_layers",
    "forget_sequence",
    "format_table",
    "inject_lora",
    "plot_history",
    "remove_lora",
    "select_detection_samples",
    "select_task_samples",
    "write_history",
]
