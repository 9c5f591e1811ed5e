"""Quantize and dequantize lists of tensors with few kernel launches (the FP8 optimizers' per-step work).

A per-tensor loop launches a dozen small kernels per tensor from Python; on a GPU that launch overhead, not
the arithmetic, would dominate an optimizer step over hundreds of parameters. These helpers use torch's
``_foreach_*`` ops and one vectorised :func:`pow2_scale` for all per-tensor scales. The results are the same as
:func:`~lightning_plugins.fp8.quantize` / :func:`~lightning_plugins.fp8.dequantize` tensor by tensor.
"""

from __future__ import annotations

import torch

from lightning_plugins.fp8.formats import FloatFormat
from lightning_plugins.fp8.quantize import tensor_amax, to_float32
from lightning_plugins.fp8.scaling import pow2_scale

__all__ = ["amax_many", "dequantize_many", "quantize_many_into"]


def dequantize_many(datas: list[torch.Tensor], scale_invs: list[torch.Tensor]) -> list[torch.Tensor]:
    """New fp32 tensors ``data.float() * scale_inv`` for each pair."""
    return torch._foreach_mul([to_float32(d) for d in datas], scale_invs)


def amax_many(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``max(|t|)`` of each tensor, as one fp32 vector (on a GPU through torch's foreach inf-norm, whose NaN
    handling is the kernel's: the FP8 optimizers' moments never hold NaN, since steps with non-finite
    gradients are skipped)."""
    if tensors[0].device.type == "cpu":  # torch's CPU inf-norm is ~5x slower than a min/max pass
        return torch.stack([tensor_amax(t) for t in tensors])
    return torch.stack(torch._foreach_norm(tensors, ord=float("inf"))).to(torch.float32)


def quantize_many_into(
    tensors: list[torch.Tensor], fmt: FloatFormat, datas: list[torch.Tensor], scale_invs: list[torch.Tensor]
) -> None:
    """Quantize each fp32 tensor to ``fmt`` with its own just-in-time power-of-two scale (previous scale 1, as
    :func:`~lightning_plugins.fp8.quantize`), writing the values into ``datas`` and ``1/scale`` into
    ``scale_invs`` in place (saturating: out-of-range values become ``±fmt.max``)."""
    if not tensors:
        return
    scales = pow2_scale(amax_many(tensors), fmt.max)
    scaled = torch._foreach_mul(tensors, list(scales.unbind(0)))
    torch._foreach_clamp_min_(scaled, -fmt.max)
    torch._foreach_clamp_max_(scaled, fmt.max)
    torch._foreach_copy_(datas, scaled)  # the cast to the storage dtype
    torch._foreach_copy_(scale_invs, list(torch.reciprocal(scales).unbind(0)))
