"""The checkpointed state of :class:`~.callback.GSLoRA`: packing it, and checking and unpacking a saved one."""

from __future__ import annotations

from typing import Any, Optional

STATE_VERSION = 1


def _copy(value: Optional[dict]) -> Optional[dict]:
    return dict(value) if value is not None else None


def pack_state(callback: Any, elapsed: float) -> dict[str, Any]:
    """The callback's state (``elapsed``: the task's seconds so far) as its ``state_dict``."""
    prototypes = None
    if callback._prototype_values is not None:
        prototypes = {"task": callback._prototype_task, "classes": callback._prototype_classes.cpu(),
                      "values": callback._prototype_values.cpu()}
    return {
        "version": STATE_VERSION,
        "tasks": [list(t) for t in callback.tasks],
        "rank": callback.rank,
        "lora_alpha": callback.lora_alpha,
        "task_index": callback.task_index,
        "history": [dict(row) for row in callback.history],
        "before": {t: dict(v) for t, v in callback._before.items()},
        "prototypes": prototypes,
        "elapsed": elapsed,
        "stop": _copy(callback._stop),
        "cooldown": _copy(callback._cooldown),
        "previous_forget_term": callback._previous_term,
    }


def check_state(state_dict: dict[str, Any], tasks: list[tuple[int, ...]], rank: int, lora_alpha: float) -> None:
    """Raise if ``state_dict`` was saved for other tasks or another LoRA rank or alpha."""
    saved = [tuple(t) for t in state_dict.get("tasks", [])]
    if saved != list(tasks):
        raise ValueError(
            f"the checkpoint's GSLoRA state is for tasks {[list(t) for t in saved]}, but this callback has "
            f"tasks {[list(t) for t in tasks]}; build GSLoRA with the same tasks to resume the sequence"
        )
    if state_dict.get("rank") != rank or state_dict.get("lora_alpha") != lora_alpha:
        raise ValueError(
            f"the checkpoint's LoRA has rank {state_dict.get('rank')}, lora_alpha {state_dict.get('lora_alpha')}; "
            f"this callback has rank {rank}, lora_alpha {lora_alpha}. Use the same values to resume"
        )


def unpack_state(callback: Any, state_dict: dict[str, Any]) -> None:
    """Set the callback's checkpointed attributes from a checked ``state_dict``."""
    callback.task_index = int(state_dict["task_index"])
    callback.history = [dict(row) for row in state_dict["history"]]
    callback._before = {int(t): dict(v) for t, v in state_dict["before"].items()}
    prototypes = state_dict.get("prototypes")
    if prototypes is None:
        callback._prototype_task = callback._prototype_classes = callback._prototype_values = None
    else:
        callback._prototype_task = int(prototypes["task"])
        callback._prototype_classes = prototypes["classes"]
        callback._prototype_values = prototypes["values"]
    callback._elapsed = float(state_dict.get("elapsed", 0.0))
    callback._stop = _copy(state_dict.get("stop"))
    callback._previous_term = state_dict.get("previous_forget_term")
    callback._cooldown = _copy(state_dict.get("cooldown"))
