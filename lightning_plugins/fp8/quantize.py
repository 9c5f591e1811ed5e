"""Saturating per-tensor quantization with non-finite detection, and exact dequantization."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lightning_plugins.fp8.formats import FloatFormat, get_format
from lightning_plugins.fp8.scaling import ScalingState, pow2_scale

__all__ = [
    "ScaledTensor",
    "SaturationCounter",
    "count_saturation",
    "tensor_amax",
    "quantize",
    "quantize_with_state",
    "dequantize",
]


@dataclass
class ScaledTensor:
    """Quantized values plus the per-tensor dequantization factor: ``x ≈ data.float() * scale_inv``.

    Attributes:
        data: values in the storage dtype (``float8_e4m3fn``, ``float8_e5m2`` or ``float16``).
        scale_inv: fp32 0-d tensor, ``1 / scale``.
    """

    data: torch.Tensor
    scale_inv: torch.Tensor

    @property
    def fmt(self) -> FloatFormat:
        """The storage format of ``data``."""
        return get_format(self.data.dtype)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        """Bytes held by ``data`` and ``scale_inv``."""
        return self.data.numel() * self.data.element_size() + self.scale_inv.numel() * 4

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``data * scale_inv`` computed in fp32, then cast to ``dtype``."""
        return dequantize(self.data, self.scale_inv, dtype)

    def t(self) -> ScaledTensor:
        """Transposed view of a 2-D tensor (same scale)."""
        return ScaledTensor(self.data.t(), self.scale_inv)


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """``max(|x|)`` as an fp32 0-d tensor (0 for an empty tensor); NaN if ``x`` holds a NaN."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    # one pass and no |x| temporary (2x faster on the CPU than abs().amax(); NaN and inf propagate the same way)
    low, high = torch.aminmax(x.detach())
    return torch.maximum(-low, high).to(torch.float32)


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Expected a torch.Tensor to quantize, got {type(x).__name__}.")
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"Can only quantize fp32/fp16/bf16/fp64 tensors, got dtype {x.dtype}; cast the tensor first.")


def _saturating_cast(x: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor) -> torch.Tensor:
    # fp32 product: an fp16 input times a large power of two would overflow in fp16.
    # clamp keeps NaN as NaN; inf becomes ±max (the caller has flagged it already).
    scaled = x.detach().to(torch.float32) * scale.to(device=x.device, dtype=torch.float32)
    return scaled.clamp_(-fmt.max, fmt.max).to(fmt.dtype)


def quantize(
    x: torch.Tensor,
    fmt: str | torch.dtype | FloatFormat = "e4m3",
    scale: torch.Tensor | float | None = None,
    *,
    margin: int = 0,
) -> tuple[ScaledTensor, torch.Tensor]:
    """Quantize ``x`` to ``fmt`` with a per-tensor scale, saturating at the format's max.

    Args:
        x: a floating-point tensor.
        fmt: ``"e4m3"``, ``"e5m2"``, ``"fp16"``, the matching torch dtype, or a :class:`FloatFormat`.
        scale: the multiplier (``data = cast(x * scale)``); by default the power-of-two scale from
            ``max(|x|)`` (just-in-time), with ``margin``.
        margin: headroom for the default scale.

    Returns:
        ``(q, nonfinite)``: the :class:`ScaledTensor` and a bool 0-d tensor that is True when ``x``
        held inf or NaN. The flag is computed *before* the cast, because an E4M3 cast turns inf into
        448 silently; a caller should skip the step when it is set. Returning a tensor avoids a
        host sync; ``bool(nonfinite)`` syncs.
    """
    _check_input(x)
    fmt = get_format(fmt)
    amax = tensor_amax(x)
    if scale is None:
        scale_t = pow2_scale(amax, fmt.max, margin=margin)
    else:
        scale_t = torch.as_tensor(scale, dtype=torch.float32, device=x.device).detach()
        if scale_t.numel() != 1:
            raise ValueError(f"scale must be a scalar (per-tensor scaling), got shape {tuple(scale_t.shape)}.")
        scale_t = scale_t.reshape(())
    data = _saturating_cast(x, fmt, scale_t)
    return ScaledTensor(data, torch.reciprocal(scale_t)), ~torch.isfinite(amax)


def quantize_with_state(x: torch.Tensor, state: ScalingState, record: bool = True) -> tuple[ScaledTensor, torch.Tensor]:
    """Quantize ``x`` with the scale chosen by ``state`` (JIT in warm-up, delayed afterwards).

    With ``record=True`` the amax of ``x`` is recorded in ``state`` (see
    :meth:`ScalingState.scale_for`). Returns ``(q, nonfinite)`` like :func:`quantize`.
    """
    _check_input(x)
    amax = tensor_amax(x)
    scale = state.scale_for(amax, record=record).to(x.device)
    if _SATURATION is not None and record:
        _SATURATION.add(state, x, scale)
    data = _saturating_cast(x, state.fmt, scale)
    return ScaledTensor(data, torch.reciprocal(scale)), ~torch.isfinite(amax)


@dataclass
class SaturationCounter:
    """How many values the recorded FP8 casts clipped at the format's max, per scaling state.

    ``clipped[state]`` is a 0-d int64 tensor (on the tensor's device: no host sync while counting) and
    ``elements[state]`` the number of values cast. Only casts that record an amax (training steps) count.
    """

    clipped: dict[ScalingState, torch.Tensor] = field(default_factory=dict)
    elements: dict[ScalingState, int] = field(default_factory=dict)

    def add(self, state: ScalingState, x: torch.Tensor, scale: torch.Tensor) -> None:
        """Count the values of ``x`` whose scaled magnitude exceeds the format's max (inf included)."""
        over = (x.detach().abs().to(torch.float32) * scale > state.fmt.max).sum()
        previous = self.clipped.get(state)
        self.clipped[state] = over if previous is None else previous + over.to(previous.device)
        self.elements[state] = self.elements.get(state, 0) + x.numel()


_SATURATION: SaturationCounter | None = None


@contextlib.contextmanager
def count_saturation() -> Iterator[SaturationCounter]:
    """Count clipped values of every recording FP8 cast inside the block (one extra pass per cast).

    Meant for the steps a logger records, not for every step::

        with count_saturation() as counter:
            loss = model(x).sum(); loss.backward()
        share = sum(counter.clipped.values()) / sum(counter.elements.values())
    """
    global _SATURATION
    previous, _SATURATION = _SATURATION, SaturationCounter()
    try:
        yield _SATURATION
    finally:
        _SATURATION = previous


_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
_LUT_CHUNK = 1 << 16


def to_float32(data: torch.Tensor) -> torch.Tensor:
    """``data.to(torch.float32)``; for FP8 on the CPU through a 256-entry table, bit-identical and ~5x faster.

    torch converts FP8 to fp32 on the CPU one element at a time (~7x slower than the opposite cast), which made
    the emulated GEMMs' dequantization the largest cost of a CPU FP8 training step. The table is torch's own
    conversion of every byte value, so the result is the same bit for bit (NaN included).
    """
    # Under torch.compile the generated kernel converts on its own (and a traced cache write would break the graph).
    if data.dtype not in _FP8_DTYPES or data.device.type != "cpu" or torch.compiler.is_compiling():
        return data.to(torch.float32)
    key = (data.dtype, data.device)
    table = _FP8_TABLES.get(key)
    if table is None:
        table = torch.arange(256, dtype=torch.uint8).view(data.dtype).to(torch.float32)
        _FP8_TABLES[key] = table
    codes = data.contiguous().view(torch.uint8).reshape(-1)
    if codes.numel() <= _LUT_CHUNK:
        return torch.index_select(table, 0, codes.to(torch.int32)).view(data.shape)
    # In chunks: a whole-tensor int32 index would be a large temporary whose fresh pages cost more than the lookup.
    out = torch.empty(codes.numel(), dtype=torch.float32)
    for start in range(0, codes.numel(), _LUT_CHUNK):
        stop = start + _LUT_CHUNK
        torch.index_select(table, 0, codes[start:stop].to(torch.int32), out=out[start:stop])
    return out.view(data.shape)


def dequantize(data: torch.Tensor, scale_inv: torch.Tensor | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``data.float() * scale_inv``, cast to ``dtype``. Exact for power-of-two scales (no under/overflow)."""
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"Expected a torch.Tensor to dequantize, got {type(data).__name__}.")
    scale_inv_t = torch.as_tensor(scale_inv, dtype=torch.float32, device=data.device)
    return (to_float32(data) * scale_inv_t).to(dtype)
