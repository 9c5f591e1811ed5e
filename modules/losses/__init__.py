"""Pure loss functions of the alignment stages, over plain tensors (no models, no Lightning).

- :func:`sequence_logps`: summed completion-token log-probs from causal-LM logits (prompt and padding masked).
- :func:`dpo_loss`: DPO and its variants (TRL 1.x formulas and names, plus explicit ``cdpo``).
- :func:`reward_loss`: Bradley-Terry reward-model loss with optional margin and reward centering.
"""

from .dpo import DPO_LOSS_TYPES, DPOLossOutput, dpo_loss
from .logps import SequenceLogps, sequence_logps
from .reward import RewardLossOutput, reward_loss

__all__ = [
    "DPO_LOSS_TYPES",
    "DPOLossOutput",
    "RewardLossOutput",
    "SequenceLogps",
    "dpo_loss",
    "reward_loss",
    "sequence_logps",
]
