"""``DeviceOnlyBuffers``: an ``nn.Module`` of FP8 bookkeeping tensors that follow device moves and nothing else."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["DeviceOnlyBuffers"]


class DeviceOnlyBuffers(nn.Module):
    """A module whose buffers follow ``module.to(device)`` but keep their dtypes.

    ``.half()``/``.to(torch.bfloat16)`` on a model must not turn a 2^20 fp32 scale into inf, nor FP8 data
    into fp16. Tensors left on the meta device by deferred initialisation (``to_empty``) are recreated with
    :meth:`fresh`. Tensor attributes named in ``unregistered`` (plain attributes, not buffers: DDP does not
    broadcast them) move the same way.
    """

    unregistered: tuple[str, ...] = ()

    def fresh(self, name: str, like: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The initial value of tensor ``name`` (zeros unless a subclass says otherwise)."""
        return torch.zeros_like(like, device=device)

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {name: buf for name, buf in self._buffers.items() if buf is not None}
        tensors.update({name: getattr(self, name) for name in self.unregistered})
        return tensors

    def _apply(self, fn: Any, recurse: bool = True) -> DeviceOnlyBuffers:
        tensors = self._tensors()
        probe = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        device = fn(torch.empty(0, device=probe)).device
        for name, tensor in tensors.items():
            if tensor.device != device:
                moved = self.fresh(name, tensor, device) if tensor.is_meta else tensor.to(device)
                if name in self._buffers:
                    self._buffers[name] = moved
                else:
                    setattr(self, name, moved)
        return self
