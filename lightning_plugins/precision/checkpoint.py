"""Portable checkpoints: FP8-run checkpoints that plain fp32 models and ``torch.optim.Adam(W)`` can load.

A native ``fp8-msamp`` checkpoint already loads into a model made of plain ``nn.Linear`` layers
(an ``FP8Linear`` has exactly ``weight`` and ``bias``; at O2 the weights are FP16 masters, which
``load_state_dict`` upcasts exactly). Its optimizer states, however, are E4M3/FP16 tensors with
scales that ``torch.optim.AdamW`` cannot use. :func:`to_portable_checkpoint` rewrites both:
fp32 weights, and optimizer states in ``torch.optim.Adam`` form (the exact values the FP8
optimizer would use at its next step). An ``fp8-msamp`` run resumes from either form exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lightning_plugins.fp8 import to_torch_adam_state_dict

__all__ = ["PLUGIN_KEY", "is_fp8_optimizer_state", "to_portable_checkpoint", "to_torch_optimizer_state"]

# Lightning stores a precision plugin's state under its class's __qualname__.
PLUGIN_KEY = "MSAMPPrecision"


def is_fp8_optimizer_state(state_dict: Any) -> bool:
    """Is this optimizer state dict in FP8 Adam form (moments with ``*_scale_inv``)?"""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict):
        return False
    return any(isinstance(s, dict) and "exp_avg_scale_inv" in s for s in state_dict["state"].values())


def to_torch_optimizer_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """An FP8 Adam state dict in ``torch.optim.Adam`` form, computed on the CPU (other dicts are returned as is)."""
    if not is_fp8_optimizer_state(state_dict):
        return state_dict
    on_cpu = {
        "state": {
            k: {n: v.detach().cpu() if torch.is_tensor(v) else v for n, v in s.items()}
            for k, s in state_dict["state"].items()
        },
        "param_groups": state_dict["param_groups"],
    }
    return to_torch_adam_state_dict(on_cpu)


def to_portable_checkpoint(checkpoint: dict[str, Any], weight_names: Iterable[str] | None = None) -> dict[str, Any]:
    """A shallow copy of a Lightning checkpoint with fp32 FP8-layer weights and torch Adam optimizer states.

    Args:
        checkpoint: a checkpoint dict (e.g. from ``torch.load(path, weights_only=True)``).
        weight_names: ``state_dict`` keys of the FP8 layers' weights; by default the list that
            ``MSAMPPrecision`` stored in the checkpoint.

    The input is not modified. Save the result with ``torch.save``.
    """
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError("Expected a Lightning checkpoint dict with a 'state_dict' key.")
    plugin_state = checkpoint.get(PLUGIN_KEY) or {}
    names = list(weight_names) if weight_names is not None else list(plugin_state.get("fp8_weights", ()))
    state_dict = dict(checkpoint["state_dict"])
    for name in names:
        value = state_dict.get(name)
        if torch.is_tensor(value) and value.is_floating_point() and value.dtype != torch.float32:
            state_dict[name] = value.detach().to(device="cpu", dtype=torch.float32)
    out = dict(checkpoint)
    out["state_dict"] = state_dict
    if "optimizer_states" in checkpoint:
        out["optimizer_states"] = [to_torch_optimizer_state(s) for s in checkpoint["optimizer_states"]]
    if plugin_state:
        out[PLUGIN_KEY] = {**plugin_state, "checkpoint_format": "portable"}
    return out
