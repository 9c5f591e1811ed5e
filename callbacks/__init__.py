"""Lightning callbacks of lightning-plugins (installed as ``lightning_plugins.callbacks``).

``GSLoRA``: continual forgetting (GS-LoRA, and GS-LoRA++ with ``prototypes=True``); ``ForgettingDataModule``
builds its per-task data (``DetectionForgettingDataModule`` for detectors); the task objective is pluggable
(``ClassificationObjective``, ``DetectionObjective``, any ``TaskObjective``); ``forget_sequence`` runs a whole task
sequence from one call.
"""

from lightning_plugins.callbacks.gslora import (
    ClassificationObjective,
    DetectionForgettingDataModule,
    DetectionObjective,
    ForgettingDataModule,
    GSLoRA,
    LoRALinear,
    TaskObjective,
    forget_sequence,
    format_table,
    inject_lora,
    remove_lora,
)

__all__ = ["ClassificationObjective", "DetectionForgettingDataModule", "DetectionObjective", "ForgettingDataModule",
           "GSLoRA", "LoRALinear", "TaskObjective", "forget_sequence", "format_table", "inject_lora", "remove_lora"]
