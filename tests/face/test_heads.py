"""Margin logits and heads against hand-computed values (CosFace, ArcFace, combined margin, softmax)."""

import math

import pytest
import torch

from lightning_plugins.modules.face.heads import MarginHead
from lightning_plugins.modules.losses.margin import margin_logits

COS = torch.tensor([[0.8, 0.1, -0.3], [0.2, 0.5, 0.4]])
LABELS = torch.tensor([0, 2])


def test_cosface_subtracts_the_margin_from_the_target_cosine_only():
    logits = margin_logits(COS, LABELS, scale=10.0, m3=0.35)
    expected = torch.tensor([[10 * (0.8 - 0.35), 1.0, -3.0], [2.0, 5.0, 10 * (0.4 - 0.35)]])
    torch.testing.assert_close(logits, expected)


def test_arcface_adds_the_margin_to_the_target_angle():
    logits = margin_logits(COS, LABELS, scale=10.0, m2=0.5)
    assert logits[0, 0].item() == pytest.approx(10 * math.cos(math.acos(0.8) + 0.5), abs=1e-5)
    assert logits[1, 2].item() == pytest.approx(10 * math.cos(math.acos(0.4) + 0.5), abs=1e-5)
    torch.testing.assert_close(logits[0, 1:], 10 * COS[0, 1:])


def test_arcface_gradient_carries_the_margin():
    # insightface applies the ArcFace margin in place under no_grad, so d logit / d cos is just s; here it is
    # s * sin(theta + m) / sin(theta), the derivative of s * cos(acos(c) + m)
    cosine = torch.tensor([[0.6, 0.0]], requires_grad=True)
    margin_logits(cosine, torch.tensor([0]), scale=8.0, m2=0.5)[0, 0].backward()
    theta = math.acos(0.6)
    assert cosine.grad[0, 0].item() == pytest.approx(8.0 * math.sin(theta + 0.5) / math.sin(theta), rel=1e-4)
    assert cosine.grad[0, 1].item() == 0.0


def test_arcface_guard_continues_linearly_past_pi():
    # theta + m > pi: cos would rise again; the target logit becomes cos - sin(m) * m instead
    cosine = torch.tensor([[-0.95, 0.0]])
    logit = margin_logits(cosine, torch.tensor([0]), scale=1.0, m2=0.5)[0, 0].item()
    assert math.acos(-0.95) + 0.5 > math.pi
    assert logit == pytest.approx(-0.95 - math.sin(0.5) * 0.5, abs=1e-6)


def test_combined_margin_is_cos_m1_theta_plus_m2_minus_m3():
    logits = margin_logits(COS, LABELS, scale=2.0, m1=1.5, m2=0.1, m3=0.2)
    expected = 2.0 * (math.cos(1.5 * math.acos(0.8) + 0.1) - 0.2)
    assert logits[0, 0].item() == pytest.approx(expected, abs=1e-5)


def test_margin_logits_reject_bad_values_with_the_value_named():
    with pytest.raises(ValueError, match="scale"):
        margin_logits(COS, LABELS, scale=0.0)
    with pytest.raises(ValueError, match="labels"):
        margin_logits(COS, torch.tensor([0]), scale=1.0)


def test_head_forward_is_margin_free_and_training_logits_carry_the_margin():
    torch.manual_seed(0)
    head = MarginHead(embed_dim=4, num_classes=3, kind="cosface", scale=30.0)
    features = torch.randn(5, 4)
    labels = torch.tensor([0, 1, 2, 0, 1])
    cosine = torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(head.weight, dim=1).T
    torch.testing.assert_close(head(features), 30.0 * cosine)
    torch.testing.assert_close(head(features, scale=8.0), 8.0 * cosine)
    margin = head.training_logits(features, labels)
    target = torch.nn.functional.one_hot(labels, 3).bool()
    torch.testing.assert_close(margin[target], 30.0 * (cosine[target] - 0.35))
    torch.testing.assert_close(margin[~target], 30.0 * cosine[~target])


def test_head_defaults_and_arguments():
    assert MarginHead(4, 3, "cosface").margins == (1.0, 0.0, 0.35)
    assert MarginHead(4, 3, "arcface").margins == (1.0, 0.5, 0.0)
    assert MarginHead(4, 3, "arcface", margin=0.3).margins == (1.0, 0.3, 0.0)
    assert MarginHead(4, 3, "combined", margins=(1.0, 0.2, 0.1)).margins == (1.0, 0.2, 0.1)
    softmax = MarginHead(4, 3, "softmax")
    features = torch.randn(2, 4)
    torch.testing.assert_close(softmax(features), softmax.linear(features))
    torch.testing.assert_close(softmax.training_logits(features, torch.tensor([0, 1])), softmax.linear(features))


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="sphereface"), "head must be one of"),
    (dict(kind="softmax", margin=0.3), "no margin"),
    (dict(kind="cosface", margins=(1.0, 0.0, 0.3)), "applies to head='combined'"),
    (dict(kind="combined", margin=0.3), "takes margins"),
    (dict(kind="cosface", scale=-1.0), "scale must be > 0"),
    (dict(kind="arcface", margin=2.0), "margins must satisfy"),
])
def test_head_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MarginHead(4, 3, **kwargs)
