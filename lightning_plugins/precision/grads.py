"""Gradient checks and clipping over both kinds of gradients: ``param.grad`` and FP8 side-channel gradients.

With ``wgrad_mode="fp8"`` an FP8Linear weight keeps its gradient as an E4M3 ``ScaledTensor``
(:func:`~lightning_plugins.fp8.get_fp8_grad`) and ``.grad`` stays ``None``, so torch's
``clip_grad_norm_``/``clip_grad_value_`` would silently skip it. These helpers see both.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lightning_plugins.fp8 import ScaledTensor, get_fp8_grad, quantize, set_fp8_grad

__all__ = ["grads_nonfinite", "total_grad_norm", "clip_grad_norm_", "clip_grad_value_"]

_NAN = float("nan")


def _split(params: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(params with a ``.grad``, params with an FP8 side-channel gradient); each parameter once."""
    seen: set[int] = set()
    hp, fp8 = [], []
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.grad is not None:
            hp.append(p)
        if get_fp8_grad(p) is not None:
            fp8.append(p)
    return hp, fp8


def grads_nonfinite(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Bool 0-d tensor: does any gradient of ``params`` hold inf/NaN? (no host sync)

    FP8 gradients are checked through their ``scale_inv``: FP8Linear, the FP8 all-reduce and
    :func:`clip_grad_value_` set it to NaN when the gradient was not finite (an E4M3 cast would have
    turned inf into 448).
    """
    hp, fp8 = _split(params)
    flags = [_any_nonfinite([p.grad.detach() for p in hp])]
    if fp8:
        flags.append(~torch.isfinite(torch.stack([get_fp8_grad(p).scale_inv for p in fp8])).all())
    device = next((f.device for f in flags if f.device.type != "cpu"), torch.device("cpu"))
    return torch.stack([f.to(device) for f in flags]).any()


def _any_nonfinite(grads: list[torch.Tensor]) -> torch.Tensor:
    """Bool 0-d: does any tensor hold inf/NaN? One fused check per (device, dtype), not three kernels per tensor:
    torch's own GradScaler op, with an unscale factor of 1 (values unchanged)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    flags = []
    for g in grads:
        if g.is_sparse:  # the fused op takes dense tensors
            flags.append(~torch.isfinite(g.coalesce().values()).all())
        else:
            groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), group in groups.items():
        found = torch.zeros((), dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, torch.ones((), device=device))
        flags.append(found > 0)
    if not flags:
        return torch.zeros((), dtype=torch.bool)
    device = flags[0].device
    return torch.stack([f.to(device) for f in flags]).any()


def _fp8_norm(g: ScaledTensor, norm_type: float) -> torch.Tensor:
    return torch.linalg.vector_norm(g.data.to(torch.float32), norm_type) * g.scale_inv.abs().to(torch.float32)


def total_grad_norm(params: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The ``norm_type`` norm of all gradients of ``params`` (``.grad`` and FP8), as one fp32 0-d tensor."""
    norm_type = float(norm_type)
    hp, fp8 = _split(params)
    norms = [torch.linalg.vector_norm(p.grad.detach(), norm_type).to(torch.float32) for p in hp]
    norms += [_fp8_norm(get_fp8_grad(p), norm_type) for p in fp8]
    if not norms:
        return torch.zeros((), dtype=torch.float32)
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Scale all gradients so that their total norm is at most ``max_norm``; returns the norm before clipping.

    Same rule as ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``, at
    most 1). An FP8 gradient is scaled through its ``scale_inv`` only (free, exact).
    """
    params = list(params)
    total = total_grad_norm(params, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    hp, fp8 = _split(params)
    for p in hp:
        p.grad.mul_(coef.to(device=p.grad.device, dtype=p.grad.dtype))
    for p in fp8:
        g = get_fp8_grad(p)
        set_fp8_grad(p, ScaledTensor(g.data, g.scale_inv * coef.to(g.scale_inv.device)))
    return total


@torch.no_grad()
def clip_grad_value_(params: Iterable[torch.Tensor], clip_value: float) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]``.

    An FP8 gradient is dequantized, clamped and quantized again to its format with a just-in-time
    power-of-two scale (exact for every unclamped element, since the scale only grows by powers of two).
    """
    clip_value = float(clip_value)
    hp, fp8 = _split(params)
    for p in hp:
        p.grad.clamp_(-clip_value, clip_value)
    for p in fp8:
        g = get_fp8_grad(p)
        q, bad = quantize(g.dequantize(torch.float32).clamp_(-clip_value, clip_value), g.fmt)
        bad = bad | ~torch.isfinite(g.scale_inv)
        set_fp8_grad(p, ScaledTensor(q.data, torch.where(bad, torch.full_like(q.scale_inv, _NAN), q.scale_inv)))
