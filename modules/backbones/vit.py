"""A small pre-norm Vision Transformer, built in the project, with a patch stem or a convolutional (hybrid) stem.

Module names follow timm (``blocks.N.attn``, ``blocks.N.mlp.fc1``, ``blocks.N.mlp.fc2``) so that tools
targeting timm-style FFN layers, such as the ``GSLoRA`` callback, find them without configuration.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

STEMS = ("patch", "conv")


class PatchEmbedding(nn.Module):
    """Split an image into non-overlapping patches and project each one to ``embed_dim``."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.num_patches = (image_size // patch_size) ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class ConvStem(nn.Module):
    """Convolutional stem of the hybrid ViT: images of any size -> a map of tokens ``[B, embed_dim, h, w]``.

    Two 3x3 convolutions (``embed_dim // 2`` then ``embed_dim`` channels), each followed by group norm and GELU
    and each with stride 2 while the map is still larger than ``max_grid`` on a side (stride 1 otherwise), a 1x1
    projection, then average pooling down to at most ``max_grid`` x ``max_grid`` tokens. A 28x28 image gives 7x7
    tokens, an 8x8 image 4x4, a 32x32 image 7x7 (pooled from 8x8). The convolutions supply local features and a
    locality prior, which a patch stem has to learn from data. Group norm (up to 8 groups) keeps no running
    statistics, so train and eval mode agree and a frozen stem stays exactly frozen (e.g. under GS-LoRA).

    Args:
        in_channels: image channels.
        embed_dim: token width.
        max_grid: largest side of the token grid.
    """

    def __init__(self, in_channels: int, embed_dim: int, max_grid: int = 7) -> None:
        super().__init__()
        hidden = max(8, embed_dim // 2)
        self.conv1 = nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(math.gcd(8, hidden), hidden)
        self.conv2 = nn.Conv2d(hidden, embed_dim, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(math.gcd(8, embed_dim), embed_dim)
        self.act = nn.GELU()
        self.proj = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)
        self.max_grid = max_grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.act(self.norm1(self._conv(self.conv1, images)))
        maps = self.act(self.norm2(self._conv(self.conv2, maps)))
        height, width = maps.shape[-2:]
        if height > self.max_grid or width > self.max_grid:
            maps = nn.functional.adaptive_avg_pool2d(maps, (min(height, self.max_grid), min(width, self.max_grid)))
        return self.proj(maps)

    def _conv(self, conv: nn.Conv2d, maps: torch.Tensor) -> torch.Tensor:
        stride = 2 if max(maps.shape[-2:]) > self.max_grid else 1
        return nn.functional.conv2d(maps, conv.weight, conv.bias, stride=stride, padding=1)


class SpatialReadout(nn.Module):
    """Hybrid ViT readout: normed tokens -> average-pooled to ``grid`` x ``grid`` -> flattened -> ``proj`` -> norm.

    Unlike a CLS token or a global mean, it keeps *where* each feature is from the first step on, so the
    classifier learns as quickly as a convolutional net with a dense head while the blocks learn to mix tokens.

    Args:
        embed_dim: token width (also the output width).
        grid: side of the pooled grid.
    """

    def __init__(self, embed_dim: int, grid: int = 4) -> None:
        super().__init__()
        self.grid = grid
        self.proj = nn.Linear(grid * grid * embed_dim, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        maps = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
        pooled = nn.functional.adaptive_avg_pool2d(maps, self.grid).flatten(1)
        return self.norm(self.proj(pooled))


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, dim = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        mixed = nn.functional.scaled_dot_product_attention(
            query, key, value, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(mixed.transpose(1, 2).reshape(batch, length, dim))


class FeedForward(nn.Module):
    """The block's FFN: ``fc1`` -> GELU -> ``fc2`` (two plain ``nn.Linear`` layers)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(tokens)))))


class Block(nn.Module):
    """Pre-norm Transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.drop(self.attn(self.norm1(tokens)))
        return tokens + self.mlp(self.norm2(tokens))


class VisionTransformer(nn.Module):
    """ViT feature extractor: images ``[B, C, H, W]`` -> embedding ``[B, embed_dim]``.

    Two stems (``stem``):

    * ``"patch"``: the classic ViT: non-overlapping ``patch_size`` patches, a CLS token, learned position
      embeddings for ``image_size``; the embedding is the normed CLS token. Needs ``image_size`` and ``patch_size``.
    * ``"conv"``: a hybrid ViT: a small convolutional stem (:class:`ConvStem`) turns the image into at most
      ``max_grid`` x ``max_grid`` tokens, learned position embeddings on that grid are resized to the actual token
      grid, and the embedding is a spatial readout of the normed output tokens (:class:`SpatialReadout`: pooled
      to 4x4, flattened, projected to ``embed_dim``). It takes any image size (``image_size=None``) or checks
      the given one; ``patch_size`` must stay ``None``. It learns small data much faster than the patch stem.

    Either way the blocks are ``blocks.N`` with the FFN layers ``blocks.N.mlp.fc1`` / ``blocks.N.mlp.fc2``.

    Args:
        image_size: side of the (square) input image in pixels; ``None`` only with ``stem="conv"`` (any size).
        patch_size: side of a patch; must divide ``image_size`` (``stem="patch"`` only).
        in_channels: image channels (1 for grey, 3 for colour).
        embed_dim: token width.
        depth: number of Transformer blocks.
        num_heads: attention heads; must divide ``embed_dim``.
        mlp_ratio: FFN hidden width as a multiple of ``embed_dim``.
        dropout: dropout inside the blocks and on the token embeddings.
        stem: ``"patch"`` or ``"conv"`` (see above).
        max_grid: largest token grid side of the conv stem (``stem="conv"`` only).
    """

    def __init__(
        self,
        image_size: Optional[int] = 28,
        patch_size: Optional[int] = 4,
        in_channels: int = 1,
        embed_dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        stem: str = "patch",
        max_grid: int = 7,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"ViT stem must be one of {list(STEMS)}, got {stem!r}")
        if stem == "patch":
            if image_size is None or patch_size is None:
                raise ValueError(
                    f"ViT stem='patch' needs image_size and patch_size (got image_size={image_size!r}, "
                    f"patch_size={patch_size!r}); set both, or use stem='conv', which takes any image size"
                )
        else:
            if patch_size is not None:
                raise ValueError(
                    f"ViT patch_size={patch_size!r} applies to stem='patch' only; with stem='conv' leave it unset "
                    "(the conv stem makes its own tokens)"
                )
            if not isinstance(max_grid, int) or max_grid < 1:
                raise ValueError(f"ViT max_grid must be a positive integer, got {max_grid!r}")
        _check_vit_shape(image_size, patch_size, in_channels, embed_dim, depth, num_heads, mlp_ratio, dropout)
        self.stem = stem
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_features = embed_dim
        if stem == "patch":
            self.patch_embed = PatchEmbedding(image_size, patch_size, in_channels, embed_dim)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        else:
            self.conv_stem = ConvStem(in_channels, embed_dim, max_grid)
            self.pos_embed = nn.Parameter(torch.zeros(1, max_grid * max_grid, embed_dim))
            self.max_grid = max_grid
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        if stem == "conv":
            self.readout = SpatialReadout(embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.stem == "patch":
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check_input(images)
        if self.stem == "patch":
            tokens = self.patch_embed(images)
            cls = self.cls_token.expand(tokens.shape[0], -1, -1)
            tokens = self.pos_drop(torch.cat([cls, tokens], dim=1) + self.pos_embed)
        else:
            maps = self.conv_stem(images)
            grid = (maps.shape[-2], maps.shape[-1])
            tokens = self.pos_drop(maps.flatten(2).transpose(1, 2) + self._grid_pos_embed(grid))
        for block in self.blocks:
            tokens = block(tokens)
        if self.stem == "patch":
            return self.norm(tokens[:, 0])
        return self.readout(self.norm(tokens), grid)

    def _grid_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid == (self.max_grid, self.max_grid):
            return self.pos_embed
        table = self.pos_embed.reshape(1, self.max_grid, self.max_grid, -1).permute(0, 3, 1, 2)
        table = nn.functional.interpolate(table, size=grid, mode="bilinear", align_corners=False)
        return table.flatten(2).transpose(1, 2)

    def _check_input(self, images: torch.Tensor) -> None:
        side = "H, W" if self.image_size is None else f"{self.image_size}, {self.image_size}"
        if (
            images.ndim != 4
            or images.shape[1] != self.in_channels
            or (self.image_size is not None and tuple(images.shape[2:]) != (self.image_size, self.image_size))
        ):
            raise ValueError(
                f"VisionTransformer expects images of shape [B, {self.in_channels}, {side}], got "
                f"{list(images.shape)}; set image_size/in_channels to match the data"
            )


def _check_vit_shape(image_size, patch_size, in_channels, embed_dim, depth, num_heads, mlp_ratio, dropout) -> None:
    for name, value in (("image_size", image_size), ("patch_size", patch_size), ("in_channels", in_channels),
                        ("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
        if value is None and name in ("image_size", "patch_size"):
            continue
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"ViT {name} must be a positive integer, got {value!r}")
    if patch_size is not None and image_size % patch_size:
        raise ValueError(f"ViT patch_size={patch_size} must divide image_size={image_size}; pick a divisor")
    if embed_dim % num_heads:
        raise ValueError(f"ViT num_heads={num_heads} must divide embed_dim={embed_dim}")
    if mlp_ratio <= 0:
        raise ValueError(f"ViT mlp_ratio must be > 0, got {mlp_ratio!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"ViT dropout must be in [0, 1), got {dropout!r}")
