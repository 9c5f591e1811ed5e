"""Additive-margin softmax logits for face recognition (CosFace, ArcFace, combined margin), as pure functions.

With ``cos`` the cosine between a normalised embedding and every normalised class centre and ``theta = acos(cos)``,
the target class's logit becomes ``s * (cos(m1 * theta + m2) - m3)`` and every other logit stays ``s * cos``:

- CosFace: ``m1 = 1, m2 = 0, m3 = m`` (``s * (cos - m)``);
- ArcFace: ``m1 = 1, m2 = m, m3 = 0`` (``s * cos(theta + m)``);
- SphereFace-style multiplicative margins: ``m1 > 1``.

Unlike insightface's ``CombinedMarginLoss``, which applies the ArcFace margin in place under ``no_grad`` (so the
gradient is that of plain ``s * cos``), the margin here is ordinary autograd, and every combination is allowed.
When ``m1 * theta + m2`` passes ``pi`` the cosine would rise again (a larger angle scoring better), so past that
point the target logit continues linearly instead: ``cos - m3 - sin(m2) * m2`` (ArcFace's usual guard).
"""

from __future__ import annotations

import math

import torch

from ._checks import check_number

# Keep acos away from +-1, where its derivative is infinite.
_COS_EPS = 1e-6


def margin_logits(cosine: torch.Tensor, labels: torch.Tensor, scale: float, m1: float = 1.0, m2: float = 0.0,
                  m3: float = 0.0) -> torch.Tensor:
    """Scaled logits ``[B, C]`` with the combined margin on each row's target class (see the module docstring).

    Args:
        cosine: cosines ``[B, C]`` in [-1, 1] between normalised embeddings and normalised class centres.
        labels: target classes ``[B]`` (int64).
        scale: the logit scale ``s``.
        m1: multiplicative angular margin (1 = none).
        m2: additive angular margin in radians (ArcFace).
        m3: additive cosine margin (CosFace).
    """
    check_number("scale", scale, low=0.0, low_open=True)
    check_number("m1", m1, low=1.0)
    check_number("m2", m2, low=0.0, high=math.pi / 2)
    check_number("m3", m3, low=0.0, high=2.0)
    if cosine.ndim != 2:
        raise ValueError(f"`cosine` must have shape (batch, classes), got {tuple(cosine.shape)}")
    if labels.shape != cosine.shape[:1]:
        raise ValueError(f"`labels` must have shape ({cosine.shape[0]},), got {tuple(labels.shape)}")
    target_cos = cosine.gather(1, labels.view(-1, 1))
    if m1 == 1.0 and m2 == 0.0:
        target = target_cos - m3
    else:
        theta = torch.acos(target_cos.clamp(-1 + _COS_EPS, 1 - _COS_EPS))
        angle = m1 * theta + m2
        fallback = target_cos - m3 - math.sin(m2) * m2
        target = torch.where(angle <= math.pi, torch.cos(angle) - m3, fallback)
    logits = cosine.scatter(1, labels.view(-1, 1), target)
    return logits * scale
