"""FP8 weight-gradient side channel.

Autograd cannot hold an FP8 gradient for an fp32/fp16/bf16 parameter (it casts it back, and FP8
accumulation is not implemented), so with ``wgrad_mode="fp8"`` an :class:`FP8Linear` stores its
weight gradient here, as an E4M3 :class:`ScaledTensor` on the parameter, and leaves ``.grad``
as ``None``. Micro-batches accumulate by dequantize-add-requantize (MS-AMP's behaviour). An FP8
optimizer or precision plugin reads it with :func:`get_fp8_grad` and clears it with
:func:`clear_fp8_grads` (the equivalent of ``zero_grad``).

How it stays compatible with ``torch.compile``: the layer's backward writes the gradient in place
into a :class:`WeightGradSlot` the layer owns (a tensor mutation, which traces), and the Python
bookkeeping (attaching the slot to the parameter) runs in a hook on a 0-d leaf "token" that takes
part in the layer's autograd graph: autograd runs leaf hooks eagerly, after the compiled backward.
Like ``.grad``, the gradient appears during backward, so a ``zero_grad`` between forward and
backward (Lightning's order) does not lose it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_plugins.fp8.buffers import DeviceOnlyBuffers
from lightning_plugins.fp8.quantize import ScaledTensor, to_float32

__all__ = ["get_fp8_grad", "set_fp8_grad", "clear_fp8_grads", "detach_fp8_grad", "fp8_grad_params", "WeightGradSlot"]

_ATTR = "_fp8_grad"
_SLOT_ATTR = "_fp8_grad_slot"


def get_fp8_grad(param: torch.Tensor) -> ScaledTensor | None:
    """The FP8 gradient stored for ``param``, or ``None``."""
    return getattr(param, _ATTR, None)


def set_fp8_grad(param: torch.Tensor, grad: ScaledTensor | None) -> None:
    """Store (or with ``None`` remove) the FP8 gradient of ``param``.

    For the weight of an FP8Linear the values are copied into the layer's slot, which later
    micro-batches accumulate into.
    """
    if grad is None:
        _drop(param)
        return
    if not isinstance(grad, ScaledTensor):
        raise TypeError(f"An FP8 gradient must be a ScaledTensor, got {type(grad).__name__}.")
    if tuple(grad.data.shape) != tuple(param.shape):
        raise ValueError(f"FP8 gradient shape {tuple(grad.data.shape)} != parameter shape {tuple(param.shape)}.")
    slot = getattr(param, _SLOT_ATTR, None)
    if slot is not None:
        slot.store(grad)
        grad = slot.as_scaled_tensor()
    setattr(param, _ATTR, grad)


def fp8_grad_params(params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Parameters (of a module, or from an iterable) that currently hold an FP8 gradient."""
    items = params.parameters() if isinstance(params, nn.Module) else params
    return [p for p in items if get_fp8_grad(p) is not None]


def clear_fp8_grads(params: nn.Module | Iterable[torch.Tensor]) -> None:
    """Drop the FP8 gradients of a module's parameters (or of an iterable of parameters)."""
    items = params.parameters() if isinstance(params, nn.Module) else params
    for p in items:
        _drop(p)


def detach_fp8_grad(param: torch.Tensor) -> None:
    """Remove every trace of the FP8 side channel from ``param`` (its gradient and its slot), e.g. when the
    parameter goes back to a plain layer."""
    for attr in (_ATTR, _SLOT_ATTR):
        if hasattr(param, attr):
            delattr(param, attr)


def _drop(param: torch.Tensor) -> None:
    if get_fp8_grad(param) is not None:
        setattr(param, _ATTR, None)
        slot = getattr(param, _SLOT_ATTR, None)
        if slot is not None:  # the next backward starts from zero (data too: a poisoned gradient may hold NaN)
            slot.data.zero_()
            slot.scale_inv.zero_()


class WeightGradSlot(DeviceOnlyBuffers):
    """Where an FP8Linear's backward leaves its E4M3 weight gradient.

    Tensors: ``data`` (E4M3, the weight's shape), ``scale_inv`` (fp32 0-d; 0 with zero data = empty,
    NaN = the gradient was not finite) and ``token`` (a 0-d leaf the layer feeds into its autograd function
    while its weight needs a gradient; its hook attaches the slot to the weight). Plain tensor
    attributes rather than buffers: in no state dict, and not broadcast by DDP (which would
    overwrite the other ranks' gradients with rank 0's). They follow ``module.to(device)``.

    Args:
        owner: the FP8Linear (held weakly); its ``weight`` at backward time receives the gradient.
        device: where the tensors live.
    """

    unregistered = ("data", "scale_inv")

    def __init__(self, owner: nn.Module, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.data = torch.zeros(owner.weight.shape, dtype=torch.float8_e4m3fn, device=device)
        self.scale_inv = torch.zeros((), dtype=torch.float32, device=device)
        self.bind(owner)

    def bind(self, owner: nn.Module) -> None:
        """Deliver to ``owner.weight`` (again after a copy or unpickling: the owning layer calls this)."""
        self._owner = weakref.ref(owner)
        self.token = torch.zeros((), device=self.scale_inv.device, requires_grad=True)
        self.token.register_post_accumulate_grad_hook(self._attach)

    def _attach(self, token: torch.Tensor) -> None:
        token.grad = None
        owner = self._owner() if self._owner is not None else None
        if owner is not None:
            setattr(owner.weight, _SLOT_ATTR, self)
            setattr(owner.weight, _ATTR, self.as_scaled_tensor())

    def __getstate__(self) -> dict[str, Any]:
        # a weak reference cannot be pickled, and a deep copy would keep pointing at the original layer
        state = self.__dict__.copy()
        state["_owner"] = None
        state["token"] = None
        return state

    def _apply(self, fn: Any, recurse: bool = True) -> WeightGradSlot:
        super()._apply(fn, recurse)
        owner = self._owner() if self._owner is not None else None
        if owner is not None and self.token.device != self.scale_inv.device:
            self.bind(owner)
        return self

    def as_scaled_tensor(self) -> ScaledTensor:
        """A view of the slot (shares its storage)."""
        return ScaledTensor(self.data, self.scale_inv)

    def add_to(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` plus the slot's gradient (zero while empty: data and scale are zeroed together; NaN
        everywhere if it was poisoned)."""
        # Eager on the CPU, reading the scale costs no device sync: skip the pass over an empty slot.
        if self.scale_inv.device.type == "cpu" and not torch.compiler.is_compiling() and self.scale_inv.item() == 0:
            return grad
        return grad + to_float32(self.data) * self.scale_inv

    def store(self, grad: ScaledTensor) -> None:
        """Overwrite the slot with ``grad`` (in place)."""
        if grad.data is not self.data:
            self.data.copy_(grad.data)
        self.scale_inv.copy_(grad.scale_inv)
