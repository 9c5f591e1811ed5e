"""Image backbones: feature extractors mapping images ``[B, C, H, W]`` to embeddings ``[B, d]``.

One registry serves every module: ``build_backbone(name, **kwargs)`` (names: :func:`backbone_names`, plus
``"torchvision:<model>"`` and ``"timm:<model>"``); see :mod:`lightning_plugins.modules.backbones.registry`.
"""

from __future__ import annotations

from lightning_plugins.modules.backbones.iresnet import IBasicBlock, IResNet
from lightning_plugins.modules.backbones.registry import (
    BACKBONES,
    backbone_names,
    backbone_parameters,
    build_backbone,
    register_backbone,
)
from lightning_plugins.modules.backbones.vit import VisionTransformer

__all__ = [
    "BACKBONES", "IBasicBlock", "IResNet", "VisionTransformer", "backbone_names", "backbone_parameters",
    "build_backbone", "register_backbone",
]
