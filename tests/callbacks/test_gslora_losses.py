"""GS-LoRA loss terms against hand-computed values."""

import math

import pytest
import torch
from torch.nn import functional as F

from lightning_plugins.callbacks.gslora.losses import (
    bounded_forgetting_loss,
    group_lasso,
    group_soft_threshold_,
    gslora_loss,
    prototype_distance,
    prototype_loss,
    retention_loss,
)

LOGITS = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
TARGETS = torch.tensor([0, 1])
# CE of the two rows: log(1 + e^-2) and log 2
CE_MEAN = (math.log(1 + math.exp(-2)) + math.log(2)) / 2  # 0.410038...


def test_retention_is_mean_cross_entropy():
    assert float(retention_loss(LOGITS, TARGETS)) == pytest.approx(CE_MEAN)
    assert float(retention_loss(LOGITS[:0], TARGETS[:0])) == 0.0


def test_bounded_forgetting():
    assert float(bounded_forgetting_loss(LOGITS, TARGETS, bound=1.0)) == pytest.approx(1.0 - CE_MEAN)
    assert float(bounded_forgetting_loss(LOGITS, TARGETS, bound=0.3)) == 0.0  # CE already above the bound
    assert float(bounded_forgetting_loss(LOGITS[:0], TARGETS[:0], bound=5.0)) == 0.0
    # below the bound the gradient raises the CE, i.e. lowers the true-class logit
    logits = LOGITS.clone().requires_grad_()
    bounded_forgetting_loss(logits, TARGETS, bound=1.0).backward()
    assert logits.grad[0, 0] > 0 and logits.grad[1, 1] > 0


def test_bounded_forgetting_per_sample():
    # per-sample CE: log(1 + e^-2) = 0.126928 and log 2 = 0.693147; only the first is below the bound 0.5
    per_sample = bounded_forgetting_loss(LOGITS, TARGETS, bound=0.5, per_sample=True)
    assert float(per_sample) == pytest.approx((0.5 - math.log(1 + math.exp(-2))) / 2)
    assert float(bounded_forgetting_loss(LOGITS, TARGETS, bound=0.5)) == pytest.approx(0.5 - CE_MEAN)
    # the batch mean reaches a bound of 0.4 although the first sample is still well recognised
    assert float(bounded_forgetting_loss(LOGITS, TARGETS, bound=0.4)) == 0.0
    assert float(bounded_forgetting_loss(LOGITS, TARGETS, bound=0.4, per_sample=True)) > 0.0


def test_group_lasso_is_sum_of_group_l2_norms():
    groups = [[torch.tensor([3.0, 4.0])], [torch.tensor([[1.0, 2.0]]), torch.tensor([2.0])]]
    assert float(group_lasso(groups)) == pytest.approx(5.0 + 3.0)


def test_group_lasso_gradient_is_finite_at_zero():
    zero = torch.zeros(2, 3, requires_grad=True)
    other = torch.tensor([3.0, 4.0], requires_grad=True)
    group_lasso([[zero], [other]]).backward()
    assert torch.equal(zero.grad, torch.zeros(2, 3))
    torch.testing.assert_close(other.grad, torch.tensor([0.6, 0.8]))


def test_group_soft_threshold_shrinks_or_zeroes_each_group():
    big = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]  # group norm 5
    small = [torch.tensor([0.3, 0.4])]  # group norm 0.5
    empty = [torch.zeros(3)]
    zero = group_soft_threshold_([big, small, empty], threshold=1.0)
    assert zero == [False, True, True]
    # 1 - 1/5 = 0.8 of every tensor of the group: its norm drops from 5 to 4
    assert torch.equal(big[0], torch.tensor([2.4, 0.0])) and torch.equal(big[1], torch.tensor([[3.2]]))
    assert torch.equal(small[0], torch.zeros(2)) and torch.equal(empty[0], torch.zeros(3))
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        group_soft_threshold_([big], -1.0)


def test_kl_prototype_distance():
    prototype = torch.tensor([[0.0, 0.0]])  # softmax (1/2, 1/2)
    embedding = torch.tensor([[math.log(3.0), 0.0]])  # softmax (3/4, 1/4)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # 0.143841
    assert float(prototype_distance(embedding, prototype, "kl")) == pytest.approx(expected)
    # the reference implementation's formula: F.kl_div(log_softmax(e), log_softmax(p), batchmean, log_target)
    e, p = torch.randn(4, 5), torch.randn(4, 5)
    reference = F.kl_div(F.log_softmax(e, -1), F.log_softmax(p, -1), reduction="batchmean", log_target=True)
    assert float(prototype_distance(e, p, "kl").mean()) == pytest.approx(float(reference), rel=1e-5)


def test_l2_prototype_distance():
    assert float(prototype_distance(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]]), "l2")) == 2.5


def test_prototype_loss_push_and_pull():
    e, p = torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, 0.0]])
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0)
    push_only = prototype_loss(e, p, e[:0], p[:0], bound=1.0, forget_weight=0.5)
    assert float(push_only) == pytest.approx(0.5 * (1.0 - kl))
    both = prototype_loss(e, p, e, p, bound=1.0, forget_weight=0.5, retain_weight=2.0)
    assert float(both) == pytest.approx(0.5 * (1.0 - kl) + 2.0 * kl)
    assert float(prototype_loss(e, p, e, p, bound=0.1, forget_weight=0.5)) == 0.0  # pushed beyond the bound


def test_prototype_errors():
    with pytest.raises(ValueError, match="distance must be one of"):
        prototype_distance(torch.zeros(1, 2), torch.zeros(1, 2), "cos")
    with pytest.raises(ValueError, match="same shape"):
        prototype_distance(torch.zeros(1, 2), torch.zeros(1, 3))


def test_total_objective():
    groups = [[torch.tensor([3.0, 4.0])]]
    loss = gslora_loss(LOGITS, TARGETS, LOGITS, TARGETS, groups, beta=0.2, bound=1.0, alpha=0.01,
                       prototype_term=torch.tensor(0.3))
    expected = CE_MEAN + 0.2 * (1.0 - CE_MEAN) + 0.01 * 5.0 + 0.3
    assert float(loss.total) == pytest.approx(expected)
    assert float(loss.retain) == pytest.approx(CE_MEAN)
    assert float(loss.forget_ce) == pytest.approx(CE_MEAN)
    assert float(loss.structure) == 5.0
    empty = gslora_loss(LOGITS, TARGETS, LOGITS[:0], TARGETS[:0], groups, beta=0.2, bound=1.0, alpha=0.0)
    assert float(empty.total) == pytest.approx(CE_MEAN) and empty.forget_ce is None
