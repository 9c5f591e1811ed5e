"""Direct preference optimization losses over per-sequence log-probs (TRL 1.x semantics, plus explicit cDPO).

Notation: ``Δc = πθ(y_w|x) - π_ref(y_w|x)`` and ``Δr = πθ(y_l|x) - π_ref(y_l|x)`` are the chosen and rejected
log-ratios of summed completion log-probs (see :func:`~lightning_plugins.modules.losses.sequence_logps`), and
``h = Δc - Δr``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import check_number, check_pair_tensor

__all__ = ["DPO_LOSS_TYPES", "DPOLossOutput", "dpo_loss"]

DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "cdpo",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "sigmoid_norm",
    "aot",
    "aot_unpaired",
    "discopop",
)
"""Accepted ``loss_type`` values; all but ``cdpo`` carry TRL 1.x's names and formulas."""

# label_smoothing interval per loss type: (low, high, low_open, high_open); every other type requires 0.
_SMOOTHED = {
    "cdpo": (0.0, 0.5, False, True),
    "robust": (0.0, 0.5, False, True),
    "aot": (0.0, 0.5, False, True),
    "aot_unpaired": (0.0, 0.5, False, True),
    "exo_pair": (0.0, 1.0, True, True),
}
_LENGTH_NORMALIZED = ("ipo", "sigmoid_norm")


class DPOLossOutput(NamedTuple):
    """Per-pair DPO losses and the implicit rewards TRL logs (``rewards/*``)."""

    losses: torch.Tensor
    """``(B,)`` per-pair loss; the training loss is its mean (:attr:`loss`)."""
    chosen_rewards: torch.Tensor
    """``(B,)`` detached ``β·Δc``."""
    rejected_rewards: torch.Tensor
    """``(B,)`` detached ``β·Δr``."""

    @property
    def loss(self) -> torch.Tensor:
        """Scalar batch mean of :attr:`losses`, as TRL reduces it."""
        return self.losses.mean()

    @property
    def margins(self) -> torch.Tensor:
        """``(B,)`` detached ``β·h`` (chosen minus rejected reward)."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracies(self) -> torch.Tensor:
        """``(B,)`` float 1.0 where the chosen reward is *strictly* larger (so 0.0 when policy == reference)."""
        return (self.chosen_rewards > self.rejected_rewards).to(self.chosen_rewards.dtype)

    def metrics(self) -> dict[str, torch.Tensor]:
        """Batch means under TRL's metric names: ``rewards/chosen|rejected|accuracies|margins``."""
        return {
            "rewards/chosen": self.chosen_rewards.mean(),
            "rewards/rejected": self.rejected_rewards.mean(),
            "rewards/accuracies": self.accuracies.mean(),
            "rewards/margins": self.margins.mean(),
        }


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    discopop_tau: float = 0.05,
) -> DPOLossOutput:
    """Per-pair DPO-family loss from summed completion log-probs, each argument of shape ``(B,)``.

    Per-pair formulas (``σ`` the logistic function, ``ε = label_smoothing``):

    - ``sigmoid``: ``-log σ(βh)``. ``label_smoothing`` must be 0: TRL 1.x silently ignores it here.
    - ``cdpo``: ``-(1-ε) log σ(βh) - ε log σ(-βh)``, conservative DPO; this is ``sigmoid`` with label smoothing
      in TRL <= 0.28 and OpenRLHF. ``ε`` in ``[0, 0.5)``.
    - ``hinge``: ``max(0, 1 - βh)`` (SLiC).
    - ``ipo``: ``(Δc/|y_w| - Δr/|y_l| - 1/(2β))²``, length-normalized as TRL 1.x does it (TRL <= 0.28 did the
      same upstream; OpenRLHF does not normalize). Needs ``chosen_lengths`` and ``rejected_lengths``.
    - ``robust``: ``[-(1-ε) log σ(βh) + ε log σ(-βh)] / (1-2ε)``, ``ε`` in ``[0, 0.5)``.
    - ``exo_pair``: EXO, ``ε`` in ``(0, 1)`` (1e-3 recommended). ``nca_pair``, ``bco_pair`` (no running mean),
      ``sppo_hard``, ``apo_zero``, ``apo_down``: as in TRL 1.x.
    - ``sigmoid_norm``: ``-log σ(β(Δc/|y_w| - Δr/|y_l|))``; needs the lengths.
    - ``aot`` / ``aot_unpaired``: cDPO on batch-sorted log-ratios (pairs are coupled through the sort).
    - ``discopop``: logistic/exponential blend with temperature ``discopop_tau``.

    Args:
        policy_chosen_logps / policy_rejected_logps: policy log-probs; the only inputs that receive gradients.
        ref_chosen_logps / ref_rejected_logps: reference log-probs, detached here. TRL 1.x dropped
            ``reference_free``; pass zeros to get it.
        beta: ``β > 0`` (``τ`` for IPO).
        loss_type: one of :data:`DPO_LOSS_TYPES`.
        label_smoothing: ``ε``; only ``cdpo``, ``robust``, ``exo_pair``, ``aot`` and ``aot_unpaired`` use it.
        chosen_lengths / rejected_lengths: ``(B,)`` completion token counts (``SequenceLogps.num_tokens``),
            clamped to at least 1; required by ``ipo`` and ``sigmoid_norm``.
        discopop_tau: DiscoPOP temperature (> 0), TRL's default 0.05.

    Returns:
        :class:`DPOLossOutput`: per-pair ``losses`` and detached ``chosen_rewards = β·Δc``,
        ``rejected_rewards = β·Δr``; ``.loss``, ``.margins``, ``.accuracies``, ``.metrics()`` derive from them.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"Unknown DPO loss_type {loss_type!r}; allowed: {', '.join(DPO_LOSS_TYPES)}.")
    beta = check_number("beta", beta, low=0.0, low_open=True)
    label_smoothing = check_number("label_smoothing", label_smoothing)
    if loss_type in _SMOOTHED:
        low, high, low_open, high_open = _SMOOTHED[loss_type]
        try:
            check_number("label_smoothing", label_smoothing, low=low, high=high, low_open=low_open,
                         high_open=high_open)
        except ValueError as err:
            hint = " EXO needs a positive value; 1e-3 is recommended." if loss_type == "exo_pair" else ""
            raise ValueError(f"{str(err).rstrip('.')} for loss_type={loss_type!r}.{hint}") from None
    elif label_smoothing != 0.0:
        users = ", ".join(_SMOOTHED)
        hint = (
            " For conservative DPO (TRL <= 0.28's and OpenRLHF's sigmoid loss with label smoothing) use "
            "loss_type='cdpo'; TRL 1.x ignores label_smoothing for 'sigmoid'."
            if loss_type == "sigmoid" else ""
        )
        raise ValueError(
            f"label_smoothing={label_smoothing} has no effect with loss_type={loss_type!r}; only {users} use it. "
            f"Set label_smoothing=0.0 or pick one of those.{hint}"
        )

    batch = check_pair_tensor("policy_chosen_logps", policy_chosen_logps).shape[0]
    if batch == 0:
        raise ValueError("dpo_loss got an empty batch (0 pairs); drop empty batches before the loss.")
    check_pair_tensor("policy_rejected_logps", policy_rejected_logps, batch)
    check_pair_tensor("ref_chosen_logps", ref_chosen_logps, batch)
    check_pair_tensor("ref_rejected_logps", ref_rejected_logps, batch)

    chosen_logratios = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_logratios = policy_rejected_logps - ref_rejected_logps.detach()
    h = chosen_logratios - rejected_logratios

    if loss_type in _LENGTH_NORMALIZED:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(
                f"loss_type={loss_type!r} normalizes by completion length: pass chosen_lengths= and "
                "rejected_lengths= (e.g. `sequence_logps(...).num_tokens` of the chosen and rejected rows)."
            )
        chosen_avg = chosen_logratios / _lengths("chosen_lengths", chosen_lengths, batch, h)
        rejected_avg = rejected_logratios / _lengths("rejected_lengths", rejected_lengths, batch, h)

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "cdpo":
        losses = _cdpo(beta * h, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * h)
        flipped = -label_smoothing * F.logsigmoid(-beta * h)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    elif loss_type == "exo_pair":
        # KL(softmax over {chosen, rejected} of β·log-ratios || [1-ε, ε]), expanded for two responses
        eps = torch.tensor(label_smoothing, dtype=h.dtype, device=h.device)
        win, lose = beta * h, -beta * h
        losses = torch.sigmoid(win) * (F.logsigmoid(win) - torch.log1p(-eps)) + torch.sigmoid(lose) * (
            F.logsigmoid(lose) - torch.log(eps)
        )
    elif loss_type == "nca_pair":
        chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
        losses = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    elif loss_type == "sppo_hard":
        losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * h))
    elif loss_type == "sigmoid_norm":
        losses = -F.logsigmoid(beta * (chosen_avg - rejected_avg))
    elif loss_type == "aot":
        policy_sorted = torch.sort(policy_chosen_logps - policy_rejected_logps).values
        ref_sorted = torch.sort((ref_chosen_logps - ref_rejected_logps).detach()).values
        losses = _cdpo(beta * (policy_sorted - ref_sorted), label_smoothing)
    elif loss_type == "aot_unpaired":
        delta = torch.sort(chosen_logratios).values - torch.sort(rejected_logratios).values
        losses = _cdpo(beta * delta, label_smoothing)
    else:  # discopop
        tau = check_number("discopop_tau", discopop_tau, low=0.0, low_open=True)
        logits = beta * h
        mix = torch.sigmoid(logits / tau)
        losses = -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix

    return DPOLossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def _cdpo(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return -F.logsigmoid(logits) * (1 - eps) - F.logsigmoid(-logits) * eps


def _lengths(name: str, value: object, batch: int, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim != 1 or value.shape[0] != batch:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"`{name}` must be a tensor of shape ({batch},) holding completion token counts, got {shape}.")
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"`{name}` must hold token counts (int or float), got dtype {value.dtype}.")
    if (value < 0).any():
        raise ValueError(f"`{name}` must be non-negative token counts, got {value.min().item()}.")
    return value.detach().to(like.dtype).clamp(min=1.0)
