"""IResNet: the "improved" pre-activation ResNet used as the face backbone of ArcFace (insightface arcface_torch).

Written for this project after the published architecture; module names (``conv1``, ``bn1``, ``prelu``,
``layerN.M.{bn1,conv1,bn2,prelu,conv2,bn3,downsample}``, ``bn2``, ``dropout``, ``fc``, ``features``) follow
arcface_torch, so its released backbone state dicts load with ``load_state_dict``. Unlike arcface_torch, which
hard-codes a 7x7 final map (112x112 inputs only), the ``fc`` input size is derived from ``image_size`` and the
number of stages, so any ``image_size`` divisible by ``2 ** len(layers)`` works.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

BN_EPS = 1e-5


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """``BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN`` plus a shortcut (1x1 conv + BN when the shape changes).

    Args:
        in_channels: input channels.
        channels: output channels.
        stride: stride of the second convolution (and of the shortcut).
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=BN_EPS),
            )

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(maps))))))
        shortcut = maps if self.downsample is None else self.downsample(maps)
        return out + shortcut


class IResNet(nn.Module):
    """Face embedding CNN: images ``[B, in_channels, image_size, image_size]`` -> embeddings ``[B, embed_dim]``.

    Stem ``conv3x3 (stride 1) -> BN -> PReLU``; one stage of :class:`IBasicBlock` per entry of ``layers`` (the
    first block of each stage halves the map); then ``BN2d -> flatten -> Dropout -> Linear -> BatchNorm1d``. The
    final ``BatchNorm1d`` (``features``) has its weight frozen at 1 (``requires_grad=False``) as in arcface_torch.

    Initialisation as arcface_torch: conv weights ``N(0, 0.1)``, BN weights 1 and biases 0, PReLU 0.25, the
    ``fc`` layer PyTorch's default. (Every conv is followed by a BN, so the conv scale does not matter for the
    forward pass; the tiny ``iresnet_small`` preset trains well with it.)

    Args:
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for IResNet-18.
        widths: channels per stage (same length as ``layers``).
        image_size: input side; must be a multiple of ``2 ** len(layers)``.
        in_channels: image channels.
        embed_dim: embedding width (``num_features``).
        dropout: dropout before ``fc``.
        stem_width: stem channels; ``None`` means ``widths[0]``.
    """

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        image_size: int = 112,
        in_channels: int = 3,
        embed_dim: int = 512,
        dropout: float = 0.0,
        stem_width: Optional[int] = None,
    ) -> None:
        super().__init__()
        layers, widths = tuple(layers), tuple(widths)
        stem_width = widths[0] if stem_width is None and widths else stem_width
        _check_arguments(layers, widths, image_size, in_channels, embed_dim, dropout, stem_width)
        self.layers = layers
        self.widths = widths
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_features = embed_dim
        self.conv1 = _conv3x3(in_channels, stem_width)
        self.bn1 = nn.BatchNorm2d(stem_width, eps=BN_EPS)
        self.prelu = nn.PReLU(stem_width)
        channels = stem_width
        for index, (blocks, width) in enumerate(zip(layers, widths), start=1):
            stage = [IBasicBlock(channels, width, stride=2)]
            stage += [IBasicBlock(width, width) for _ in range(blocks - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*stage))
            channels = width
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.dropout = nn.Dropout(dropout)
        side = image_size // 2 ** len(layers)
        self.fc = nn.Linear(channels * side * side, embed_dim)
        self.features = nn.BatchNorm1d(embed_dim, eps=BN_EPS)
        self._init_weights()
        self.features.weight.requires_grad = False

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"IResNet expects images of shape [B, {self.in_channels}, {self.image_size}, {self.image_size}], "
                f"got {list(images.shape)}; set image_size/in_channels to match the data"
            )
        maps = self.prelu(self.bn1(self.conv1(images)))
        for index in range(1, len(self.layers) + 1):
            maps = getattr(self, f"layer{index}")(maps)
        flat = self.dropout(self.bn2(maps).flatten(1))
        return self.features(self.fc(flat))


def allowed_image_sizes(num_stages: int, up_to: int = 224) -> list[int]:
    """Input sides an IResNet with ``num_stages`` stages accepts, up to ``up_to`` (the multiples of
    ``2**num_stages``)."""
    step = 2**num_stages
    return list(range(step, up_to + 1, step))


def _check_arguments(layers, widths, image_size, in_channels, embed_dim, dropout, stem_width) -> None:
    if not layers or not all(isinstance(n, int) and n >= 1 for n in layers):
        raise ValueError(f"IResNet layers must be a non-empty sequence of positive integers, got {layers!r}")
    if len(widths) != len(layers) or not all(isinstance(w, int) and w >= 1 for w in widths):
        raise ValueError(
            f"IResNet widths must be {len(layers)} positive integers (one per stage of layers={layers!r}), "
            f"got {widths!r}"
        )
    for name, value in (("in_channels", in_channels), ("embed_dim", embed_dim), ("stem_width", stem_width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"IResNet {name} must be a positive integer, got {value!r}")
    step = 2 ** len(layers)
    if not isinstance(image_size, int) or image_size < step or image_size % step:
        examples = ", ".join(str(size) for size in allowed_image_sizes(len(layers), 8 * step)) + ", ..."
        raise ValueError(
            f"IResNet image_size={image_size!r} is not allowed with {len(layers)} stages: each stage halves the "
            f"map, so image_size must be a positive multiple of {step} ({examples})"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"IResNet dropout must be in [0, 1), got {dropout!r}")


__all__ = ["IBasicBlock", "IResNet", "allowed_image_sizes"]
