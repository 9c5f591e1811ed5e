"""GS-LoRA / GS-LoRA++ objective as pure functions over tensors.

For one training step with retained samples ``(x_r, y_r)`` and samples to forget ``(x_f, y_f)``::

    L = CE(f(x_r), y_r)                                  retention
      + beta  * ReLU(BND - CE(f(x_f), y_f))              bounded forgetting (CE is the batch mean)
      + alpha * sum_g ||theta_g||_2                      group lasso over the LoRA groups (no sqrt(size) weight)
      + w_f * ReLU(BND_pro - mean_f d(p_y, e(x)))        GS-LoRA++: push forgotten samples off their prototype
      + w_r * mean_r d(p_y, e(x))                        GS-LoRA++: pull retained samples to theirs (0 in the paper)

``d`` is ``KL(softmax(p) || softmax(e))`` over the feature dimension (the reference default) or the mean squared
error. Every term of an empty part of the batch is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.nn import functional as F

PROTOTYPE_DISTANCES = ("kl", "l2")


def retention_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy on the retained samples (0 for an empty batch)."""
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    return F.cross_entropy(logits.float(), targets)


def bounded_forgetting_loss(
    logits: torch.Tensor, targets: torch.Tensor, bound: float, per_sample: bool = False
) -> torch.Tensor:
    """``ReLU(bound - CE)`` with CE the mean cross-entropy of the batch to forget (0 for an empty batch).

    Minimising it raises the forgotten samples' CE until it reaches ``bound``, then stops pushing. The batch mean
    (the paper) can reach the bound with some forgotten classes pushed far and others not at all; ``per_sample``
    bounds each sample instead, ``mean_i ReLU(bound - CE_i)``, so every sample is pushed until its own CE is there.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    if per_sample:
        return F.relu(bound - F.cross_entropy(logits.float(), targets, reduction="none")).mean()
    return F.relu(bound - F.cross_entropy(logits.float(), targets))


def group_lasso(groups: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """``sum_g sqrt(sum_{W in g} ||W||_F^2)``: the L2 norm of each group's tensors together, summed over groups.

    Computed as the norm of the per-tensor norms, whose gradient is 0 (not NaN) for an all-zero group.
    """
    if not groups:
        raise ValueError("group_lasso needs at least one group of tensors")
    norms = [torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w.float()) for w in g])) for g in groups]
    return torch.stack(norms).sum()


@torch.no_grad()
def group_soft_threshold_(groups: Sequence[Sequence[torch.Tensor]], threshold: float) -> list[bool]:
    """Proximal step of the group lasso, in place: ``theta_g <- theta_g * max(0, 1 - threshold / ||theta_g||)``.

    A group whose norm is at most ``threshold`` becomes exactly zero (it is switched off); the others shrink by
    ``threshold`` in norm. Returns, per group, whether it is zero afterwards.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    zero = []
    for tensors in groups:
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w.float()) for w in tensors])))
        factor = max(0.0, 1.0 - threshold / norm) if norm > 0 else 0.0
        for w in tensors:
            w.mul_(factor)
        zero.append(factor == 0.0)
    return zero


def prototype_distance(embeddings: torch.Tensor, prototypes: torch.Tensor, distance: str = "kl") -> torch.Tensor:
    """Per-sample distance ``[B]`` between embeddings ``[B, d]`` and their class prototypes ``[B, d]``.

    ``"kl"``: ``KL(softmax(p) || softmax(e)) = sum_j softmax(p)_j (log softmax(p)_j - log softmax(e)_j)``.
    ``"l2"``: mean squared difference over the feature dimension.
    """
    if distance not in PROTOTYPE_DISTANCES:
        raise ValueError(f"distance must be one of {PROTOTYPE_DISTANCES}, got {distance!r}")
    if embeddings.shape != prototypes.shape:
        raise ValueError(
            f"embeddings {list(embeddings.shape)} and prototypes {list(prototypes.shape)} must have the same shape"
        )
    embeddings, prototypes = embeddings.float(), prototypes.float()
    if distance == "l2":
        return (embeddings - prototypes).pow(2).mean(dim=-1)
    log_p = F.log_softmax(prototypes, dim=-1)
    return (log_p.exp() * (log_p - F.log_softmax(embeddings, dim=-1))).sum(dim=-1)


def prototype_loss(
    forget_embeddings: torch.Tensor,
    forget_prototypes: torch.Tensor,
    retain_embeddings: torch.Tensor,
    retain_prototypes: torch.Tensor,
    bound: float,
    forget_weight: float,
    retain_weight: float = 0.0,
    distance: str = "kl",
) -> torch.Tensor:
    """GS-LoRA++ term: ``w_f ReLU(bound - mean_f d) + w_r mean_r d`` (each part 0 when its batch is empty)."""
    total = forget_embeddings.new_zeros((), dtype=torch.float32)
    if forget_weight and forget_embeddings.shape[0]:
        push = prototype_distance(forget_embeddings, forget_prototypes, distance).mean()
        total = total + forget_weight * F.relu(bound - push)
    if retain_weight and retain_embeddings.shape[0]:
        total = total + retain_weight * prototype_distance(retain_embeddings, retain_prototypes, distance).mean()
    return total


@dataclass
class GSLoRALoss:
    """The terms of one step; ``total`` is what is minimised, the others are unweighted, for logging."""

    total: torch.Tensor
    retain: torch.Tensor
    forget_ce: Optional[torch.Tensor]
    forget: torch.Tensor
    structure: torch.Tensor
    prototype: torch.Tensor


def gslora_loss(
    retain_logits: torch.Tensor,
    retain_targets: torch.Tensor,
    forget_logits: torch.Tensor,
    forget_targets: torch.Tensor,
    groups: Sequence[Sequence[torch.Tensor]],
    *,
    beta: float,
    bound: float,
    alpha: float,
    prototype_term: Optional[torch.Tensor] = None,
    bound_per_sample: bool = False,
) -> GSLoRALoss:
    """Compose the GS-LoRA objective (see the module docstring); ``prototype_term`` is an already weighted
    :func:`prototype_loss` (GS-LoRA++) or ``None``; ``bound_per_sample`` as in :func:`bounded_forgetting_loss`."""
    retain = retention_loss(retain_logits, retain_targets)
    forget = bounded_forgetting_loss(forget_logits, forget_targets, bound, bound_per_sample)
    structure = group_lasso(groups) if groups else retain.new_zeros(())
    prototype = prototype_term if prototype_term is not None else retain.new_zeros(())
    total = retain + beta * forget + alpha * structure + prototype
    forget_ce = (
        F.cross_entropy(forget_logits.detach().float(), forget_targets) if forget_logits.shape[0] else None
    )
    return GSLoRALoss(total, retain, forget_ce, forget, structure, prototype)
