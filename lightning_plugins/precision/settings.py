"""Validation of the ``MSAMPPrecision`` options: every bad value is named with the allowed ones and a fix."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_plugins.fp8 import BACKENDS, DEFAULT_EXCLUDE, EXP_AVG_DTYPES, EXP_AVG_SQ_DTYPES, MASTER_WEIGHTS

LEVELS = ("O1", "O2", "O3")
GRAD_COMMS = ("fp8", "hp")
CHECKPOINT_FORMATS = ("native", "portable")
STAT_MODES = ("summary", "per_layer", "off")
# None = automatic: bf16 autocast for CUDA ops, no autocast (fp32) for CPU ops.
_COMPUTE_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def check_choice(option: str, value: Any, allowed: Sequence[str], fix: str = "") -> str:
    """``value`` if it is one of ``allowed`` (strings), else a ValueError naming both."""
    if isinstance(value, str) and value in allowed:
        return value
    hint = f" {fix}" if fix else ""
    raise ValueError(f"Unknown {option} {value!r}; allowed: {list(allowed)}.{hint}")


def check_bool(option: str, value: Any) -> bool:
    """``value`` if it is a bool, else a TypeError naming it."""
    if not isinstance(value, bool):
        raise TypeError(f"{option} must be True or False, got {value!r}.")
    return value


def check_level(level: Any) -> str:
    """Normalize ``"o1"``/``"O1"``, ``"o2"``/``"O2"`` and ``"o3"``/``"O3"``; anything else is an error."""
    normalized = level.upper() if isinstance(level, str) else level
    return check_choice(
        "MS-AMP level",
        normalized,
        LEVELS,
        "O1 = FP8 GEMMs and FP8 gradient communication with any optimizer; O2 = O1 + FP8/FP16 Adam states and "
        "FP16 master weights (needs Adam/AdamW); O3 = O2 with FP8 weights all-gathered in FP8 and masters/states "
        "sharded (needs ModelParallelStrategy, i.e. FSDP2).",
    )


def check_compute_dtype(compute_dtype: Any) -> torch.dtype | None:
    """``None`` (automatic), fp32 or bf16, given as a torch dtype or a name."""
    if compute_dtype is None:
        return None
    if isinstance(compute_dtype, torch.dtype) and compute_dtype in (torch.float32, torch.bfloat16):
        return compute_dtype
    if isinstance(compute_dtype, str) and compute_dtype.lower() in _COMPUTE_DTYPES:
        return _COMPUTE_DTYPES[compute_dtype.lower()]
    raise ValueError(
        f"Unsupported compute_dtype {compute_dtype!r}; allowed: None (bf16 autocast on CUDA, fp32 on CPU), "
        f"{sorted(_COMPUTE_DTYPES)} or torch.float32/torch.bfloat16. float16 autocast would need loss scaling, "
        "which this plugin does not do: use 'bfloat16'."
    )


def check_exclude(exclude: Any) -> Any:
    """Keep the default object for the default patterns, so that only user patterns warn when they match nothing."""
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        return (exclude,)
    if not isinstance(exclude, Sequence) or not all(isinstance(p, str) and p for p in exclude):
        raise TypeError(f"exclude must be a list of non-empty module-name patterns, got {exclude!r}.")
    return DEFAULT_EXCLUDE if tuple(exclude) == DEFAULT_EXCLUDE else tuple(exclude)


def check_positive_int(option: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{option} must be an int >= {minimum}, got {value!r}.")
    return value


def check_filter(fn: Any) -> Callable[..., bool] | None:
    if fn is not None and not callable(fn):
        raise TypeError(f"module_filter_fn must be a callable (module, name) -> bool or None, got {fn!r}.")
    return fn


def check_backend(backend: Any) -> str:
    return check_choice("FP8 GEMM backend", backend, BACKENDS, "'auto' picks 'torch' on CUDA sm89+, else 'emulated'.")


def check_optimizer_formats(exp_avg_dtype: Any, exp_avg_sq_dtype: Any, master_weights: Any) -> tuple[str, str, str]:
    return (
        check_choice("exp_avg_dtype", exp_avg_dtype, EXP_AVG_DTYPES),
        check_choice("exp_avg_sq_dtype", exp_avg_sq_dtype, EXP_AVG_SQ_DTYPES),
        check_choice("master_weights", master_weights, MASTER_WEIGHTS),
    )
