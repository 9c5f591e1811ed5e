"""`reward_loss`: golden values from alignment.md §3, margin and centering by hand, gradients and errors."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_plugins.modules.losses import reward_loss

GOLDEN_TOL = 1e-6


def test_golden_margin():
    out = reward_loss(torch.tensor([1.5]), torch.tensor([0.5]), margin=torch.tensor([0.5]))
    assert out.loss.dtype == torch.float32 and out.loss.ndim == 0
    assert abs(out.loss.item() - 0.4740770) <= GOLDEN_TOL


def test_golden_margin_and_centering():
    out = reward_loss(torch.tensor([1.5]), torch.tensor([0.5]), margin=torch.tensor([0.5]),
                      center_rewards_coefficient=0.01)
    assert abs(out.loss.item() - 0.5140770) <= GOLDEN_TOL
    assert abs(out.loss.item() - (0.4740770 + 0.01 * 4)) <= GOLDEN_TOL


def test_plain_bradley_terry_by_hand():
    chosen, rejected = [2.0, -1.0, 0.25, 3.0], [1.0, 0.5, 0.25, -4.0]
    out = reward_loss(torch.tensor(chosen), torch.tensor(rejected))
    expected = [math.log1p(math.exp(-(c - r))) for c, r in zip(chosen, rejected)]
    torch.testing.assert_close(out.losses.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)
    assert abs(out.loss.item() - sum(expected) / 4) <= GOLDEN_TOL


def test_per_pair_margin_and_centering_by_hand():
    chosen, rejected, margin = [2.0, -1.0, 0.25], [1.0, 0.5, 0.25], [0.0, 1.0, 2.0]
    coefficient = 0.05
    out = reward_loss(torch.tensor(chosen), torch.tensor(rejected), margin=torch.tensor(margin),
                      center_rewards_coefficient=coefficient)
    bt = [math.log1p(math.exp(-(c - r - m))) for c, r, m in zip(chosen, rejected, margin)]
    center = [(c + r) ** 2 for c, r in zip(chosen, rejected)]
    expected = sum(bt) / 3 + coefficient * sum(center) / 3
    assert abs(out.loss.item() - expected) <= GOLDEN_TOL
    per_pair = [b + coefficient * s for b, s in zip(bt, center)]
    torch.testing.assert_close(out.losses.double(), torch.tensor(per_pair, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.losses.mean(), out.loss)


def test_scalar_margin_equals_per_pair_margin():
    chosen, rejected = torch.tensor([0.3, 1.2]), torch.tensor([0.1, -0.4])
    as_float = reward_loss(chosen, rejected, margin=0.7).loss
    as_tensor = reward_loss(chosen, rejected, margin=torch.tensor([0.7, 0.7])).loss
    as_zero_dim = reward_loss(chosen, rejected, margin=torch.tensor(0.7)).loss
    torch.testing.assert_close(as_float, as_tensor, rtol=0, atol=0)
    torch.testing.assert_close(as_zero_dim, as_tensor, rtol=0, atol=0)


def test_zero_coefficient_and_zero_margin_change_nothing():
    chosen, rejected = torch.tensor([0.3, 1.2]), torch.tensor([0.1, -0.4])
    plain = reward_loss(chosen, rejected).loss
    torch.testing.assert_close(reward_loss(chosen, rejected, margin=torch.zeros(2),
                                           center_rewards_coefficient=0.0).loss, plain, rtol=0, atol=0)


def test_metrics_follow_trl_names():
    out = reward_loss(torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.5, 0.5]), margin=torch.tensor([9.0] * 3))
    metrics = out.metrics()
    assert set(metrics) == {"accuracy", "margin", "min_reward", "mean_reward", "max_reward"}
    assert metrics["accuracy"].item() == pytest.approx(1 / 3)  # strict >: the tie does not count
    assert metrics["margin"].item() == pytest.approx((1.0 - 1.5 + 0.0) / 3)  # without the margin input
    assert metrics["min_reward"].item() == -1.0
    assert metrics["max_reward"].item() == 2.0
    assert metrics["mean_reward"].item() == pytest.approx(3.5 / 6)


def test_gradients_reach_rewards_but_not_margin():
    chosen = torch.tensor([1.5, 0.2], requires_grad=True)
    rejected = torch.tensor([0.5, 0.4], requires_grad=True)
    margin = torch.tensor([0.5, 0.0], requires_grad=True)
    out = reward_loss(chosen, rejected, margin=margin, center_rewards_coefficient=0.01)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    grad_chosen, grad_rejected, grad_margin = torch.autograd.grad(out.loss, (chosen, rejected, margin),
                                                                  allow_unused=True)
    assert grad_margin is None
    # d/dr_c = -σ(-(r_c - r_r - m))/B + 2c(r_c + r_r)/B
    sig = 1 / (1 + math.exp(1.5 - 0.5 - 0.5))
    assert abs(grad_chosen[0].item() - (-sig / 2 + 2 * 0.01 * 2.0 / 2)) <= GOLDEN_TOL
    assert abs(grad_rejected[0].item() - (sig / 2 + 2 * 0.01 * 2.0 / 2)) <= GOLDEN_TOL


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"chosen_rewards": torch.zeros(2, 1)}, ValueError, r"chosen_rewards.*\(2, 1\).*squeeze\(-1\)"),
        ({"rejected_rewards": torch.zeros(3)}, ValueError, "rejected_rewards.*3 entries.*2 pairs"),
        ({"chosen_rewards": torch.zeros(2, dtype=torch.long)}, TypeError, "chosen_rewards.*floating.*int64"),
        ({"margin": torch.zeros(3)}, ValueError, r"margin.*\(2,\).*\(3,\)"),
        ({"margin": "big"}, TypeError, "margin.*'big'"),
        ({"center_rewards_coefficient": -0.01}, ValueError, r"center_rewards_coefficient.*\[0.0, inf\).*-0.01"),
        ({"chosen_rewards": torch.zeros(0), "rejected_rewards": torch.zeros(0)}, ValueError, "empty batch"),
    ],
)
def test_input_errors(kwargs, error, match):
    arguments = {"chosen_rewards": torch.zeros(2), "rejected_rewards": torch.zeros(2), **kwargs}
    with pytest.raises(error, match=match):
        reward_loss(**arguments)
