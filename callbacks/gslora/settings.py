"""Checks of :class:`~.callback.GSLoRA`'s arguments, and of the class ids against the model's and data's."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from lightning_plugins.callbacks.gslora.lora import GROUPINGS
from lightning_plugins.callbacks.gslora.losses import PROTOTYPE_DISTANCES
from lightning_plugins.callbacks.gslora.objectives import OBJECTIVES, TaskObjective
from lightning_plugins.callbacks.gslora.tasks import check_class_range


def _whole(value: Any, minimum: int, bools: bool = False) -> bool:
    """Whether ``value`` is an integer ``>= minimum`` (a bool counts only with ``bools``)."""
    return (bools or not isinstance(value, bool)) and isinstance(value, int) and value >= minimum


def _in_range(value: Any, low: float, high: float, high_open: bool = False) -> bool:
    """Whether ``value`` is a number (not a bool) in ``[low, high]``, or ``[low, high)`` with ``high_open``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return low <= value < high if high_open else low <= value <= high


def check_settings(tasks: Sequence[tuple[int, ...]], *, grouping: str, rank: int, lora_alpha: float, bound: float,
                   proto_bound: float, alpha: float, proto_retain_weight: float, weight_decay: float, min_lr: float,
                   zero_group_threshold: float, alpha_warmup_epochs: int, proto_distance: str, lr: Optional[float],
                   num_classes: Optional[int], early_stop: bool, stop_forget_acc: float, stop_saturation: float,
                   stop_plateau: float, stop_cooldown: int) -> None:
    """Raise on the first argument out of its range (the checks of ``beta``, ``objective``... come after)."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    if not _whole(rank, 1):
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    for name, value in (("lora_alpha", lora_alpha), ("bound", bound), ("proto_bound", proto_bound)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    for name, value in (("alpha", alpha), ("proto_retain_weight", proto_retain_weight),
                        ("weight_decay", weight_decay), ("min_lr", min_lr),
                        ("zero_group_threshold", zero_group_threshold)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if not _whole(alpha_warmup_epochs, 0, bools=True):
        raise ValueError(f"alpha_warmup_epochs must be an integer >= 0, got {alpha_warmup_epochs!r}")
    if proto_distance not in PROTOTYPE_DISTANCES:
        raise ValueError(f"proto_distance must be one of {PROTOTYPE_DISTANCES}, got {proto_distance!r}")
    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be > 0 (or None to use the module's optimizer), got {lr!r}")
    if num_classes is not None:
        check_class_range(tasks, num_classes, "num_classes argument")
    _check_stopping(early_stop, stop_forget_acc, stop_saturation, stop_plateau, stop_cooldown)


def _check_stopping(early_stop: bool, stop_forget_acc: float, stop_saturation: float, stop_plateau: float,
                    stop_cooldown: int) -> None:
    """The checks of the ``early_stop`` arguments."""
    if not isinstance(early_stop, bool):
        raise TypeError(f"early_stop must be True or False, got {early_stop!r}")
    if not _in_range(stop_forget_acc, 0.0, 100.0):
        raise ValueError(
            f"stop_forget_acc is an accuracy in percent, between 0 and 100 (e.g. 1.0 for 1 %); got {stop_forget_acc!r}"
        )
    if not _in_range(stop_saturation, 0.0, 1.0, high_open=True):
        raise ValueError(
            f"stop_saturation is a share of the bound, in [0, 1) (e.g. 0.05: the forgetting loss may stop at "
            f"5 % of the bound); got {stop_saturation!r}"
        )
    if not _in_range(stop_plateau, 0.0, 1.0, high_open=True):
        raise ValueError(
            f"stop_plateau is a relative decrease per epoch, in [0, 1) (e.g. 0.05: flat when the forgetting loss "
            f"fell by less than 5 %; 0 turns the plateau test off); got {stop_plateau!r}"
        )
    if not _whole(stop_cooldown, 0):
        raise ValueError(
            f"stop_cooldown is a number of epochs, an integer >= 0 (0 stops as soon as the rule holds); got "
            f"{stop_cooldown!r}"
        )


def check_objective(objective: Union[str, TaskObjective], stop_forget_ap: Optional[float]) -> None:
    """Raise on an unknown ``objective`` or a ``stop_forget_ap`` outside ``[0, 100]``."""
    if not isinstance(objective, TaskObjective) and objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES} or a TaskObjective instance (e.g. "
                         f"DetectionObjective(bound=15.0)), got {objective!r}")
    if stop_forget_ap is not None and not _in_range(stop_forget_ap, 0.0, 100.0):
        raise ValueError(f"stop_forget_ap is an AP in percent, between 0 and 100, or None (10 % of AP_f before "
                         f"the task); got {stop_forget_ap!r}")


class PerTask:
    """A float given once for all tasks or once per task."""

    def __init__(self, name: str, value: Union[float, Sequence[float]], num_tasks: int) -> None:
        self.name = name
        self.value = value
        values = [value] if isinstance(value, (int, float)) else list(value)
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0]
        if bad or not values:
            raise ValueError(f"{name} must be a number >= 0 or a list of them (one per task), got {value!r}")
        self.values = [float(v) for v in values]
        self.per_task = not isinstance(value, (int, float))
        if self.per_task and len(self.values) != num_tasks:
            raise ValueError(
                f"{name} gives {len(self.values)} values for {num_tasks} tasks; give one value per task "
                "or a single number"
            )

    def __getitem__(self, task: int) -> float:
        return self.values[task] if self.per_task else self.values[0]


def check_num_classes(tasks: Sequence[tuple[int, ...]], num_classes: Optional[int], pl_module: Any,
                      datamodule: Any) -> None:
    """Check the class ids against the first integer ``num_classes`` of the argument, module, hparams, datamodule."""
    candidates = [
        (num_classes, "num_classes argument"),
        (getattr(pl_module, "num_classes", None), f"{type(pl_module).__name__}.num_classes"),
        (getattr(getattr(pl_module, "hparams", {}), "get", lambda *_: None)("num_classes"),
         f"{type(pl_module).__name__}.hparams.num_classes"),
    ]
    if datamodule is not None:
        try:
            declared = getattr(datamodule, "num_classes", None)
            candidates.append((declared, f"{type(datamodule).__name__}.num_classes"))
        except RuntimeError:
            pass  # a datamodule that knows its classes only after setup; the logits are checked later
    for value, source in candidates:
        if isinstance(value, int) and not isinstance(value, bool):
            check_class_range(tasks, value, source)
            missing = [c for c in getattr(datamodule, "missing_classes", ()) or () if c >= value]
            if missing:
                raise ValueError(f"missing_classes {missing} are out of range for {value} classes ({source})")
            return
