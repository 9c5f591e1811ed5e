"""Image backbones: feature extractors mapping images ``[B, C, H, W]`` to embeddings ``[B, d]``."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from lightning_plugins.modules.backbones.vit import VisionTransformer

BACKBONES: dict[str, Callable[..., nn.Module]] = {"vit": VisionTransformer}


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone by name, e.g. ``build_backbone("vit", depth=4)``."""
    if name not in BACKBONES:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)} or pass an nn.Module instance "
            "(in YAML: a class_path/init_args mapping)"
        )
    return BACKBONES[name](**kwargs)


__all__ = ["BACKBONES", "VisionTransformer", "build_backbone"]
