"""Persistent cache of precomputed DPO reference log-probs (one safetensors file per dataset split).

The key is ``sha256(split fingerprint, reference weights hash, tokenizer identity)``; the split fingerprint of the
preference DataModule already covers the tokenized rows and ``max_length``. A hit skips the reference forward
passes entirely, across runs and machines sharing the folder. Files are written atomically (temporary file, then
rename), so concurrent writers leave one complete file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

__all__ = [
    "cache_key",
    "default_cache_dir",
    "load_reference_logps",
    "save_reference_logps",
    "tokenizer_identity",
    "weights_hash",
]

CACHE_SUBDIR = "ref_logps"


def default_cache_dir() -> Path:
    """``$LIGHTNING_PLUGINS_CACHE/ref_logps``, by default ``~/.cache/lightning-plugins/ref_logps``."""
    from lightning_plugins.modules.align.loading import cache_root

    return cache_root() / CACHE_SUBDIR


def weights_hash(weights: Union[nn.Module, dict[str, torch.Tensor]]) -> str:
    """sha256 over every state-dict entry's name, dtype, shape and raw bytes (sorted by name)."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            flat = tensor.to("cpu").contiguous().reshape(-1)
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_identity(tokenizer: Any) -> str:
    """sha256 of a tokenizer's class, vocabulary and special tokens."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    specials = getattr(tokenizer, "special_tokens_map", {})
    payload = json.dumps({"class": type(tokenizer).__name__, "vocab": sorted(vocab.items()),
                          "specials": {k: str(v) for k, v in sorted(specials.items())}}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_key(fingerprint: str, reference_hash: str, tokenizer_id: str) -> str:
    """The cache file stem for one split."""
    for name, value in (("fingerprint", fingerprint), ("reference_hash", reference_hash),
                        ("tokenizer_id", tokenizer_id)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"cache_key: `{name}` must be a non-empty string, got {value!r}.")
    return hashlib.sha256(f"{fingerprint}\n{reference_hash}\n{tokenizer_id}".encode()).hexdigest()


def load_reference_logps(path: Union[str, Path]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(chosen, rejected)`` float tensors of shape ``(N,)`` from a cache file, or None when it does not exist."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    if set(tensors) != {"chosen", "rejected"} or tensors["chosen"].shape != tensors["rejected"].shape:
        raise ValueError(f"Reference log-prob cache {path} is not a valid cache file (expected tensors 'chosen' and "
                         "'rejected' of equal shape); delete it to recompute.")
    return tensors["chosen"], tensors["rejected"]


def save_reference_logps(path: Union[str, Path], chosen: torch.Tensor, rejected: torch.Tensor,
                         metadata: Optional[dict[str, str]] = None) -> Path:
    """Write ``chosen``/``rejected`` ``(N,)`` tensors atomically as safetensors (with string ``metadata``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({"chosen": chosen.detach().float().cpu().contiguous(),
                   "rejected": rejected.detach().float().cpu().contiguous()}, tmp,
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
