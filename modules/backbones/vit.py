"""A small pre-norm Vision Transformer, built in the project.

Module names follow timm (``blocks.N.attn``, ``blocks.N.mlp.fc1``, ``blocks.N.mlp.fc2``) so that tools
targeting timm-style FFN layers, such as the ``GSLoRA`` callback, find them without configuration.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbedding(nn.Module):
    """Split an image into non-overlapping patches and project each one to ``embed_dim``."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.num_patches = (image_size // patch_size) ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


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
    """ViT feature extractor: images ``[B, C, H, W]`` -> CLS embedding ``[B, embed_dim]``.

    Args:
        image_size: side of the (square) input image in pixels.
        patch_size: side of a patch; must divide ``image_size``.
        in_channels: image channels (1 for grey, 3 for colour).
        embed_dim: token width.
        depth: number of Transformer blocks.
        num_heads: attention heads; must divide ``embed_dim``.
        mlp_ratio: FFN hidden width as a multiple of ``embed_dim``.
        dropout: dropout inside the blocks and on the token embeddings.
    """

    def __init__(
        self,
        image_size: int = 28,
        patch_size: int = 4,
        in_channels: int = 1,
        embed_dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_vit_shape(image_size, patch_size, in_channels, embed_dim, depth, num_heads, mlp_ratio, dropout)
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_features = embed_dim
        self.patch_embed = PatchEmbedding(image_size, patch_size, in_channels, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"VisionTransformer expects images of shape [B, {self.in_channels}, {self.image_size}, "
                f"{self.image_size}], got {list(images.shape)}; set image_size/in_channels to match the data"
            )
        tokens = self.patch_embed(images)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = self.pos_drop(torch.cat([cls, tokens], dim=1) + self.pos_embed)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens[:, 0])


def _check_vit_shape(image_size, patch_size, in_channels, embed_dim, depth, num_heads, mlp_ratio, dropout) -> None:
    for name, value in (("image_size", image_size), ("patch_size", patch_size), ("in_channels", in_channels),
                        ("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"ViT {name} must be a positive integer, got {value!r}")
    if image_size % patch_size:
        raise ValueError(f"ViT patch_size={patch_size} must divide image_size={image_size}; pick a divisor")
    if embed_dim % num_heads:
        raise ValueError(f"ViT num_heads={num_heads} must divide embed_dim={embed_dim}")
    if mlp_ratio <= 0:
        raise ValueError(f"ViT mlp_ratio must be > 0, got {mlp_ratio!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"ViT dropout must be in [0, 1), got {dropout!r}")
