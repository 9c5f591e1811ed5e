"""Input validation shared by the loss functions: every message names the value, what is allowed and the fix."""

from __future__ import annotations

import math

import torch


def check_pair_tensor(name: str, value: object, batch: int | None = None) -> torch.Tensor:
    """A 1-D floating tensor of per-pair values, shape ``(batch,)`` when ``batch`` is given."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape (batch,), got {type(value).__name__}.")
    if not value.is_floating_point():
        raise TypeError(
            f"`{name}` must be a floating tensor (float32/bfloat16/float16/float64), got dtype {value.dtype}. "
            f"Cast it with `{name}.float()`."
        )
    if value.ndim != 1:
        hint = f" Use `{name}.squeeze(-1)` for a (batch, 1) score head." if value.ndim == 2 else ""
        raise ValueError(f"`{name}` must have shape (batch,), got shape {tuple(value.shape)}.{hint}")
    if batch is not None and value.shape[0] != batch:
        raise ValueError(
            f"`{name}` has {value.shape[0]} entries but the batch has {batch} pairs; "
            "all per-pair tensors must have the same shape (batch,)."
        )
    return value


def check_number(name: str, value: object, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number inside the given interval (bounds closed unless ``*_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"`{name}` must lie in {interval}, got {value}.")
    return value
