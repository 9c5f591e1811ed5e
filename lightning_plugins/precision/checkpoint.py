"""Portable checkpoints: FP8-run checkpoints that plain fp32 models and ``torch.optim.Adam(W)`` can load.

A native ``fp8-msamp`` checkpoint already loads into a model made of plain ``nn.Linear`` layers
(an ``FP8Linear`` has exactly ``weight`` and ``bias``; at O2 the weights are FP16 masters, which
``load_state_dict`` upcasts exactly). Its optimizer states, however, are E4M3/FP16 tensors with
scales that ``torch.optim.AdamW`` cannot use. :func:`to_portable_checkpoint` rewrites both:
fp32 weights, and optimizer states in ``torch.optim.Adam`` form (the exact values the FP8
optimizer would use at its next step). An ``fp8-msamp`` run resumes from either form exactly.

A sharded run (``ModelParallelStrategy``, FSDP2) saves a distributed-checkpoint folder instead:
:func:`consolidate_sharded_checkpoint` gathers it into the same portable single file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from lightning_plugins.fp8 import to_torch_adam_state_dict

__all__ = [
    "PLUGIN_KEY",
    "consolidate_sharded_checkpoint",
    "is_fp8_optimizer_state",
    "to_portable_checkpoint",
    "to_torch_optimizer_state",
]

# Lightning stores a precision plugin's state under its class's __qualname__.
PLUGIN_KEY = "MSAMPPrecision"
# What Lightning's ModelParallelStrategy writes into a sharded checkpoint folder besides the shards.
_METADATA_FILE = "meta.pt"
_DCP_INDEX_FILE = ".metadata"


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


def consolidate_sharded_checkpoint(checkpoint_dir: str | os.PathLike, output_file: str | os.PathLike | None = None
                                   ) -> dict[str, Any]:
    """A sharded ``fp8-msamp`` checkpoint folder gathered into one portable checkpoint (:func:`to_portable_checkpoint`).

    ``checkpoint_dir`` is what ``trainer.save_checkpoint`` (or a ``ModelCheckpoint``) writes under
    ``ModelParallelStrategy``: the distributed-checkpoint shards plus Lightning's ``meta.pt``. The result holds
    full fp32 weights under ``state_dict`` (a model of plain ``nn.Linear`` layers loads it with ``strict=True``),
    ``optimizer_states`` in ``torch.optim.Adam(W)`` form keyed by parameter index (the order of the optimizer's
    param groups, as a one-process run numbers them), and the rest of the Lightning checkpoint (epoch, loops,
    callbacks, the plugin's scaling state). A one-process run (``32-true`` or ``fp8-msamp`` O1/O2) resumes from
    it with ``ckpt_path``. Run it in one process; it needs the whole model in CPU memory.

    Args:
        checkpoint_dir: the sharded checkpoint folder.
        output_file: where to ``torch.save`` the result (parent folders are created); ``None``: only return it.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = Path(checkpoint_dir)
    if not folder.is_dir() or not (folder / _DCP_INDEX_FILE).is_file():
        found = "a file" if folder.is_file() else ("a folder without a distributed-checkpoint index"
                                                   if folder.is_dir() else "nothing")
        raise ValueError(
            f"consolidate_sharded_checkpoint: {str(folder)!r} is {found}; expected the folder a sharded run saves "
            "(ModelParallelStrategy with save_distributed_checkpoint=True), holding '.metadata' and '*.distcp' files. "
            "A single-file checkpoint needs no consolidation: use "
            "to_portable_checkpoint(torch.load(path, weights_only=True))."
        )
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        gathered_file = Path(scratch) / "gathered.pt"
        dcp_to_torch_save(folder, gathered_file)
        gathered = torch.load(gathered_file, map_location="cpu", weights_only=True)
    metadata_file = folder / _METADATA_FILE
    checkpoint = {}
    if metadata_file.is_file():
        checkpoint = dict(torch.load(metadata_file, map_location="cpu", weights_only=True))
    if "state_dict" not in gathered:
        raise ValueError(f"consolidate_sharded_checkpoint: {str(folder)!r} holds no 'state_dict' (keys: "
                         f"{sorted(gathered)}); it was not written by a Lightning Trainer.")
    checkpoint["state_dict"] = gathered["state_dict"]
    optimizer_keys = sorted((k for k in gathered if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    if optimizer_keys:
        checkpoint["optimizer_states"] = [_indexed_optimizer_state(gathered[k]) for k in optimizer_keys]
    portable = to_portable_checkpoint(checkpoint)
    if output_file is not None:
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)
        torch.save(portable, output_file)
    return portable


def _indexed_optimizer_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A distributed optimizer state dict (parameters named by their fully qualified names) numbered the way
    ``torch.optim.Optimizer.state_dict`` numbers them: 0.. over the param groups in order."""
    index: dict[Any, int] = {}
    groups = []
    for group in state_dict.get("param_groups", []):
        params = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            params.append(index[name])
        groups.append({**group, "params": params})
    unknown = [name for name in state_dict.get("state", {}) if name not in index]
    if unknown:
        raise ValueError(f"Optimizer state for parameters outside every param group: {unknown[:5]}")
    state = {index[name]: s for name, s in state_dict.get("state", {}).items()}
    return {"state": dict(sorted(state.items())), "param_groups": groups}
