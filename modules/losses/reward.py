"""Bradley-Terry reward-model loss with TRL RewardTrainer's optional margin and reward centering."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import check_number, check_pair_tensor

__all__ = ["RewardLossOutput", "reward_loss"]


class RewardLossOutput(NamedTuple):
    """Scalar reward-model loss, its per-pair terms and the detached rewards behind TRL's RM metrics."""

    loss: torch.Tensor
    """Scalar loss, reduced exactly as TRL's ``RewardTrainer.compute_loss``."""
    losses: torch.Tensor
    """``(B,)`` per-pair ``-log σ(r_c - r_r - m) + c·(r_c + r_r)²``; their mean equals ``loss`` up to rounding."""
    chosen_rewards: torch.Tensor
    """``(B,)`` detached chosen rewards."""
    rejected_rewards: torch.Tensor
    """``(B,)`` detached rejected rewards."""

    @property
    def accuracies(self) -> torch.Tensor:
        """``(B,)`` float 1.0 where ``r_c > r_r`` strictly."""
        return (self.chosen_rewards > self.rejected_rewards).to(self.chosen_rewards.dtype)

    @property
    def margins(self) -> torch.Tensor:
        """``(B,)`` ``r_c - r_r`` (without the per-pair ``margin`` input), TRL's ``margin`` metric per pair."""
        return self.chosen_rewards - self.rejected_rewards

    def metrics(self) -> dict[str, torch.Tensor]:
        """Batch values under TRL's RM metric names: ``accuracy``, ``margin``, ``min|mean|max_reward``."""
        rewards = torch.cat([self.chosen_rewards, self.rejected_rewards])
        return {
            "accuracy": self.accuracies.mean(),
            "margin": self.margins.mean(),
            "min_reward": rewards.min(),
            "mean_reward": rewards.mean(),
            "max_reward": rewards.max(),
        }


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
) -> RewardLossOutput:
    """Bradley-Terry pairwise loss ``-mean log σ(r_c - r_r - m) + c·mean((r_c + r_r)²)``.

    Args:
        chosen_rewards / rejected_rewards: ``(B,)`` scalar rewards (squeeze a ``(B, 1)`` score head first).
        margin: optional per-pair ``m``, a ``(B,)`` tensor or one number: the chosen reward must beat the
            rejected one by at least this much (Llama-2's graded preference margin). Not differentiated.
        center_rewards_coefficient: optional ``c >= 0`` for the centering term of arXiv 2312.09244 (TRL
            recommends 0.01); it pulls rewards towards zero mean.

    Returns:
        :class:`RewardLossOutput` with the scalar ``loss``, per-pair ``losses`` and detached rewards.
    """
    batch = check_pair_tensor("chosen_rewards", chosen_rewards).shape[0]
    if batch == 0:
        raise ValueError("reward_loss got an empty batch (0 pairs); drop empty batches before the loss.")
    check_pair_tensor("rejected_rewards", rejected_rewards, batch)

    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        if isinstance(margin, torch.Tensor):
            if margin.ndim == 0:
                margin = margin.reshape(1)
            elif margin.ndim != 1 or margin.shape[0] != batch:
                raise ValueError(
                    f"`margin` must be a number or a tensor of shape ({batch},), one value per pair, got shape "
                    f"{tuple(margin.shape)}."
                )
            if not margin.is_floating_point():
                margin = margin.to(diff.dtype)
            margin = margin.detach()
        else:
            margin = check_number("margin", margin)
        diff = diff - margin
    bradley_terry = -F.logsigmoid(diff)
    loss = bradley_terry.mean()
    losses = bradley_terry

    if center_rewards_coefficient is not None:
        coefficient = check_number("center_rewards_coefficient", center_rewards_coefficient, low=0.0)
        centering = (chosen_rewards + rejected_rewards) ** 2
        loss = loss + coefficient * torch.mean(centering)
        losses = losses + coefficient * centering

    return RewardLossOutput(loss, losses, chosen_rewards.detach(), rejected_rewards.detach())
