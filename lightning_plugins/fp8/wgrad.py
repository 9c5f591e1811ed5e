"""FP8 weight-gradient side channel.

Autograd cannot hold an FP8 gradient for an fp32/fp16/bf16 parameter (it casts it back, and FP8
accumulation is not implemented), so with ``wgrad_mode="fp8"`` an :class:`FP8Linear` stores its
weight gradient here, as an E4M3 :class:`ScaledTensor` on the parameter, and leaves ``.grad``
as ``None``. Micro-batches accumulate by dequantize-add-requantize (MS-AMP's behaviour). An FP8
optimizer or precision plugin reads it with :func:`get_fp8_grad` and clears it with
:func:`clear_fp8_grads` (the equivalent of ``zero_grad``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lightning_plugins.fp8.quantize import ScaledTensor

__all__ = ["get_fp8_grad", "set_fp8_grad", "clear_fp8_grads", "fp8_grad_params"]

_ATTR = "_fp8_grad"


def get_fp8_grad(param: torch.Tensor) -> ScaledTensor | None:
    """The FP8 gradient stored for ``param``, or ``None``."""
    return getattr(param, _ATTR, None)


def set_fp8_grad(param: torch.Tensor, grad: ScaledTensor | None) -> None:
    """Store (or with ``None`` remove) the FP8 gradient of ``param``."""
    if grad is not None and not isinstance(grad, ScaledTensor):
        raise TypeError(f"An FP8 gradient must be a ScaledTensor, got {type(grad).__name__}.")
    if grad is not None and tuple(grad.data.shape) != tuple(param.shape):
        raise ValueError(f"FP8 gradient shape {tuple(grad.data.shape)} != parameter shape {tuple(param.shape)}.")
    setattr(param, _ATTR, grad)


def fp8_grad_params(params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Parameters (of a module, or from an iterable) that currently hold an FP8 gradient."""
    items = params.parameters() if isinstance(params, nn.Module) else params
    return [p for p in items if get_fp8_grad(p) is not None]


def clear_fp8_grads(params: nn.Module | Iterable[torch.Tensor]) -> None:
    """Drop the FP8 gradients of a module's parameters (or of an iterable of parameters)."""
    items = params.parameters() if isinstance(params, nn.Module) else params
    for p in items:
        if get_fp8_grad(p) is not None:
            setattr(p, _ATTR, None)
