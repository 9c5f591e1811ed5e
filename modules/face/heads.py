"""Classification heads of a face model: normalised-weight margin heads (CosFace, ArcFace, combined) and softmax."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from lightning_plugins.modules.losses.margin import margin_logits

HEADS = ("cosface", "arcface", "combined", "softmax")
# (m1, m2, m3) when `margin` is left unset: CosFace m=0.35 (GS-LoRA's Face Transformer), ArcFace m=0.5 (insightface)
DEFAULT_MARGINS = {"cosface": (1.0, 0.0, 0.35), "arcface": (1.0, 0.5, 0.0), "combined": (1.0, 0.3, 0.2),
                   "softmax": (1.0, 0.0, 0.0)}


class MarginHead(nn.Module):
    """Class centres ``[C, d]`` scored by cosine; the margin only in :meth:`training_logits`.

    ``forward(features)`` returns margin-free logits ``scale * cos`` (what identification accuracy and forgetting
    objectives must see); :meth:`training_logits` puts the margin on each sample's own class (the training loss).
    ``kind="softmax"`` is a plain linear layer (with bias, no normalisation, no margin).

    Args:
        embed_dim: embedding width ``d``.
        num_classes: identities ``C``.
        kind: ``"cosface"``, ``"arcface"``, ``"combined"`` or ``"softmax"``.
        scale: logit scale ``s`` of the margin heads (64 in the papers; 30 or less learns faster on small data).
        margin: the margin of ``cosface`` (cosine, ``m3``) or ``arcface`` (angle in radians, ``m2``); ``None``
            uses 0.35 / 0.5.
        margins: ``(m1, m2, m3)`` of ``combined`` (``None``: ``(1.0, 0.3, 0.2)``).
    """

    def __init__(self, embed_dim: int, num_classes: int, kind: str = "cosface", scale: float = 30.0,
                 margin: Optional[float] = None, margins: Optional[tuple[float, float, float]] = None) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"head must be one of {list(HEADS)}, got {kind!r}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        if margins is not None and kind != "combined":
            raise ValueError(f"margins=(m1, m2, m3) applies to head='combined'; for head={kind!r} set margin")
        if margin is not None and kind not in ("cosface", "arcface"):
            raise ValueError(f"margin applies to head='cosface' or 'arcface'; head={kind!r} takes margins=(m1, m2, m3)"
                             if kind == "combined" else f"head='softmax' has no margin; drop margin={margin!r}")
        m1, m2, m3 = DEFAULT_MARGINS[kind] if margins is None else tuple(float(v) for v in margins)
        if margin is not None:
            m2, m3 = (0.0, float(margin)) if kind == "cosface" else (float(margin), 0.0)
        if m1 < 1 or not 0 <= m2 <= math.pi / 2 or not 0 <= m3 < 2:
            raise ValueError(f"margins must satisfy m1 >= 1, 0 <= m2 <= pi/2, 0 <= m3 < 2; got ({m1}, {m2}, {m3})")
        self.kind = kind
        self.scale = float(scale)
        self.margins = (m1, m2, m3)
        self.num_classes = num_classes
        if kind == "softmax":
            self.linear = nn.Linear(embed_dim, num_classes)
        else:
            self.weight = nn.Parameter(torch.empty(num_classes, embed_dim).normal_(0.0, 0.01))

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """Cosines ``[B, C]`` between the features and every class centre (margin heads only)."""
        if self.kind == "softmax":
            raise TypeError("head='softmax' scores with a linear layer; it has no cosines")
        return nn.functional.normalize(features, dim=1) @ nn.functional.normalize(self.weight, dim=1).T

    def forward(self, features: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
        """Margin-free logits ``[B, C]``: ``scale * cos`` (``scale`` defaults to the head's), or the linear layer."""
        if self.kind == "softmax":
            return self.linear(features)
        return self.cosine(features) * (self.scale if scale is None else scale)

    def training_logits(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits with the margin on each sample's own class, for the cross-entropy of training."""
        if self.kind == "softmax":
            return self.linear(features)
        return margin_logits(self.cosine(features), labels, self.scale, *self.margins)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, scale={self.scale}, margins={self.margins}, num_classes={self.num_classes}"
