"""Scaled floating-point storage formats: FP8 E4M3, FP8 E5M2 and (for optimizer states) FP16."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FloatFormat", "E4M3", "E5M2", "FP16", "FORMATS", "get_format"]


@dataclass(frozen=True)
class FloatFormat:
    """A storage format for per-tensor scaled values.

    Attributes:
        name: short name used in configs and state dicts (``"e4m3"``, ``"e5m2"``, ``"fp16"``).
        dtype: the torch dtype that holds the values.
        max: the largest finite magnitude; quantization saturates to it.
    """

    name: str
    dtype: torch.dtype
    max: float

    @property
    def itemsize(self) -> int:
        """Bytes per stored element."""
        return torch.empty((), dtype=self.dtype).element_size()


# Maxima follow from exponent/mantissa bits; E4M3 ("fn") has no inf, so its max is 448, not 240.
E4M3 = FloatFormat("e4m3", torch.float8_e4m3fn, 448.0)
E5M2 = FloatFormat("e5m2", torch.float8_e5m2, 57344.0)
FP16 = FloatFormat("fp16", torch.float16, 65504.0)

FORMATS: dict[str, FloatFormat] = {f.name: f for f in (E4M3, E5M2, FP16)}
_BY_DTYPE = {f.dtype: f for f in (E4M3, E5M2, FP16)}


def get_format(fmt: str | torch.dtype | FloatFormat) -> FloatFormat:
    """Resolve a format from its name (``"e4m3"``, ``"e5m2"``, ``"fp16"``), its torch dtype, or itself."""
    if isinstance(fmt, FloatFormat):
        return fmt
    if isinstance(fmt, torch.dtype):
        if fmt in _BY_DTYPE:
            return _BY_DTYPE[fmt]
        raise ValueError(
            f"Unsupported scaled dtype {fmt}; allowed: {sorted(str(d) for d in _BY_DTYPE)}. "
            "Pass one of these dtypes or a format name."
        )
    if isinstance(fmt, str):
        key = fmt.lower()
        if key in FORMATS:
            return FORMATS[key]
        raise ValueError(f"Unknown format {fmt!r}; allowed: {sorted(FORMATS)}.")
    raise TypeError(f"format must be a name, a torch.dtype or a FloatFormat, got {type(fmt).__name__}.")
