"""``ScalingRegistry``: every FP8 scaling state of one model, for a training loop or plugin.

There is no process-global state: a precision plugin (or a plain loop) builds one registry per
model after :func:`~lightning_plugins.fp8.convert_to_fp8` and calls, per optimizer step::

    loss.backward()
    if registry.found_nonfinite():   # one host sync per step
        ...skip optimizer.step(), zero the grads...
    else:
        optimizer.step()
    registry.update()                # delayed scaling; restarts warm-up where amax was inf/NaN

and wraps evaluation in ``with registry.frozen():`` (FP8 layers also freeze by themselves in
``eval()`` mode and under ``no_grad``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_plugins.fp8.linear import FP8Linear
from lightning_plugins.fp8.scaling import ScalingState, frozen_scaling, update_scaling_states

__all__ = ["ScalingRegistry"]

_FORMAT_VERSION = 1


class ScalingRegistry:
    """All :class:`FP8Linear` layers of ``module`` and their scaling states, keyed by name.

    Args:
        module: a model after conversion; the registry holds references (no copies), and
            sees layers present when it was built.
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"ScalingRegistry expects an nn.Module, got {type(module).__name__}.")
        self.layers: dict[str, FP8Linear] = {
            name: mod for name, mod in module.named_modules() if isinstance(mod, FP8Linear)
        }

    def __len__(self) -> int:
        return len(self.layers)

    def states(self) -> dict[str, ScalingState]:
        """Every scaling state, keyed ``"<layer name>.<role>"`` (roles: input, weight, grad_output, wgrad)."""
        return {
            f"{name}.{role}" if name else role: state
            for name, layer in self.layers.items()
            for role, state in layer.scaling_states().items()
        }

    def found_nonfinite(self) -> torch.Tensor:
        """Bool 0-d tensor: did any FP8 cast since the last :meth:`update` see inf/NaN? (no host sync)"""
        counts = [s.nonfinite_count for s in self.states().values()]
        if not counts:
            return torch.zeros((), dtype=torch.bool)
        devices = {c.device for c in counts}
        if len(devices) == 1:
            return torch.stack(counts).sum() > 0
        return torch.stack([c.cpu() for c in counts]).sum() > 0

    def nonfinite_layers(self) -> list[str]:
        """Names of the states that saw inf/NaN since the last update (host sync; for logging)."""
        return [name for name, s in self.states().items() if int(s.nonfinite_count) > 0]

    def update(self) -> None:
        """Delayed-scaling update of every state; call once per optimizer step, taken or skipped."""
        update_scaling_states(self.states().values())

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Context in which FP8 casts record nothing (evaluation); same as :func:`frozen_scaling`."""
        with frozen_scaling():
            yield

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable scaling states (plain tensors/ints/strings, ``torch.load(weights_only=True)``-safe)."""
        return {
            "format_version": _FORMAT_VERSION,
            "layers": {name: layer.get_scaling_state() for name, layer in self.layers.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict`. With ``strict``, the layer names must match exactly."""
        if not isinstance(state_dict, dict) or "layers" not in state_dict:
            raise ValueError("Expected a dict from ScalingRegistry.state_dict() (with a 'layers' key).")
        version = state_dict.get("format_version")
        if version != _FORMAT_VERSION:
            raise ValueError(
                f"Unsupported scaling state format_version {version!r}; this version reads {_FORMAT_VERSION}."
            )
        saved = state_dict["layers"]
        if strict and set(saved) != set(self.layers):
            missing = sorted(set(self.layers) - set(saved))
            unexpected = sorted(set(saved) - set(self.layers))
            raise ValueError(
                f"Scaling state does not match the model: missing {missing}, unexpected {unexpected}; "
                "convert the model with the same filter/exclusions, or pass strict=False."
            )
        for name, layer_state in saved.items():
            if name in self.layers:
                self.layers[name].set_scaling_state(layer_state)
