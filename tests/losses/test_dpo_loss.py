"""`dpo_loss`: the note's golden values, hand-computed formulas per loss type, gradients and input errors."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_plugins.modules.losses import DPO_LOSS_TYPES, dpo_loss

GOLDEN_TOL = 1e-6


def golden_inputs():
    """alignment.md §3: β=0.1, π_c=-10, π_r=-12, ref_c=-11, ref_r=-11, so h = 2."""
    return torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0])


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing", "expected"),
    [
        ("sigmoid", 0.0, 0.5981389),
        ("hinge", 0.0, 0.8),
        ("robust", 0.1, 0.5731388),
        ("cdpo", 0.1, 0.6181388),
    ],
)
def test_golden_values(loss_type, label_smoothing, expected):
    out = dpo_loss(*golden_inputs(), beta=0.1, loss_type=loss_type, label_smoothing=label_smoothing)
    assert out.losses.dtype == torch.float32
    assert abs(out.losses.item() - expected) <= GOLDEN_TOL
    assert abs(out.loss.item() - expected) <= GOLDEN_TOL


def test_golden_ipo_length_normalized():
    out = dpo_loss(
        *golden_inputs(), beta=0.1, loss_type="ipo",
        chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([4]),
    )
    assert abs(out.losses.item() - (0.5 + 0.25 - 5) ** 2) <= GOLDEN_TOL
    assert abs(out.losses.item() - 18.0625) <= GOLDEN_TOL


def test_golden_rewards_and_metrics():
    out = dpo_loss(*golden_inputs(), beta=0.1)
    assert abs(out.chosen_rewards.item() - 0.1) <= GOLDEN_TOL
    assert abs(out.rejected_rewards.item() + 0.1) <= GOLDEN_TOL
    assert abs(out.margins.item() - 0.2) <= GOLDEN_TOL
    metrics = out.metrics()
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}
    assert abs(metrics["rewards/chosen"].item() - 0.1) <= GOLDEN_TOL
    assert abs(metrics["rewards/rejected"].item() + 0.1) <= GOLDEN_TOL
    assert abs(metrics["rewards/margins"].item() - 0.2) <= GOLDEN_TOL
    assert metrics["rewards/accuracies"].item() == 1.0


def init_inputs(batch=3, requires_grad=True):
    """Policy == reference: every log-ratio is 0."""
    logps = torch.tensor([-5.0, -20.0, -7.5, -1.0, -3.0, -9.0])[: 2 * batch]
    chosen, rejected = logps[:batch].clone(), logps[batch:].clone()
    policy = (chosen.clone().requires_grad_(requires_grad), rejected.clone().requires_grad_(requires_grad))
    return policy + (chosen, rejected)


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing", "expected"),
    [
        ("sigmoid", 0.0, math.log(2)),
        ("cdpo", 0.2, math.log(2)),
        ("robust", 0.1, math.log(2)),
        ("hinge", 0.0, 1.0),
        ("ipo", 0.0, (1 / (2 * 0.1)) ** 2),
    ],
)
def test_invariants_at_init(loss_type, label_smoothing, expected):
    lengths = torch.tensor([3, 1, 8])
    out = dpo_loss(*init_inputs(), beta=0.1, loss_type=loss_type, label_smoothing=label_smoothing,
                   chosen_lengths=lengths, rejected_lengths=lengths + 2)
    torch.testing.assert_close(out.losses, torch.full((3,), expected), rtol=0, atol=GOLDEN_TOL)
    assert out.chosen_rewards.abs().max() == 0 and out.rejected_rewards.abs().max() == 0
    assert out.metrics()["rewards/accuracies"].item() == 0.0  # strict >, so exactly 0 at init


def test_sigmoid_gradient_at_init_is_minus_beta_over_two():
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = init_inputs(batch=3)
    loss = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1).losses.sum()
    grad_chosen, grad_rejected = torch.autograd.grad(loss, (policy_chosen, policy_rejected))
    torch.testing.assert_close(grad_chosen, torch.full((3,), -0.05), rtol=0, atol=GOLDEN_TOL)
    torch.testing.assert_close(grad_rejected, torch.full((3,), 0.05), rtol=0, atol=GOLDEN_TOL)


# Hand-written scalar references (fp64 Python math) from the formula table in alignment.md §2.2.
def _logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sig(x):
    return math.exp(_logsig(x))


def reference_loss(loss_type, pc, pr, rc, rr, beta, eps, lc, lr, tau=0.05):
    dc, dr = pc - rc, pr - rr
    h = dc - dr
    if loss_type == "sigmoid":
        return -_logsig(beta * h)
    if loss_type == "cdpo":
        return -(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    if loss_type == "ipo":
        return (dc / max(lc, 1) - dr / max(lr, 1) - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return (-(1 - eps) * _logsig(beta * h) + eps * _logsig(-beta * h)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        return _sig(beta * h) * (_logsig(beta * h) - math.log(1 - eps)) + _sig(-beta * h) * (
            _logsig(-beta * h) - math.log(eps)
        )
    if loss_type == "nca_pair":
        return -_logsig(beta * dc) - 0.5 * _logsig(-beta * dc) - 0.5 * _logsig(-beta * dr)
    if loss_type == "bco_pair":
        return -_logsig(beta * dc) - _logsig(-beta * dr)
    if loss_type == "sppo_hard":
        return (dc - 1 / (2 * beta)) ** 2 + (dr + 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return 1 - _sig(beta * dc) + _sig(beta * dr)
    if loss_type == "apo_down":
        return _sig(beta * dc) + 1 - _sig(beta * h)
    if loss_type == "sigmoid_norm":
        return -_logsig(beta * (dc / max(lc, 1) - dr / max(lr, 1)))
    if loss_type == "discopop":
        mix = _sig(beta * h / tau)
        return -_logsig(beta * h) * (1 - mix) + math.exp(-beta * h) * mix
    raise AssertionError(loss_type)


PER_PAIR_TYPES = [t for t in DPO_LOSS_TYPES if not t.startswith("aot")]
SMOOTHING = {"cdpo": 0.15, "robust": 0.2, "exo_pair": 1e-3}


@pytest.mark.parametrize("loss_type", PER_PAIR_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_each_formula_against_hand_computed_values(loss_type, beta):
    policy_chosen = [-10.0, -31.5, -4.25, -12.0, -7.0]
    policy_rejected = [-12.0, -30.0, -9.5, -12.0, -2.0]
    ref_chosen = [-11.0, -33.0, -5.0, -12.5, -6.0]
    ref_rejected = [-11.0, -29.0, -8.0, -11.0, -4.0]
    chosen_lengths, rejected_lengths = [2, 9, 3, 0, 5], [4, 7, 6, 1, 2]  # 0 is clamped to 1, as TRL does
    eps = SMOOTHING.get(loss_type, 0.0)
    out = dpo_loss(
        torch.tensor(policy_chosen), torch.tensor(policy_rejected), torch.tensor(ref_chosen),
        torch.tensor(ref_rejected), beta=beta, loss_type=loss_type, label_smoothing=eps,
        chosen_lengths=torch.tensor(chosen_lengths), rejected_lengths=torch.tensor(rejected_lengths),
    )
    expected = [
        reference_loss(loss_type, *values, beta, eps, lc, lr)
        for *values, lc, lr in zip(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths,
                                   rejected_lengths)
    ]
    torch.testing.assert_close(out.losses.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    rewards = [beta * (p - r) for p, r in zip(policy_chosen, ref_chosen)]
    torch.testing.assert_close(out.chosen_rewards.double(), torch.tensor(rewards, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)


def test_aot_sorts_across_the_batch():
    policy_chosen, policy_rejected = torch.tensor([-1.0, -5.0, -2.0]), torch.tensor([-4.0, -3.0, -2.5])
    ref_chosen, ref_rejected = torch.tensor([-2.0, -2.0, -2.0]), torch.tensor([-1.0, -3.0, -2.0])
    eps, beta = 0.1, 0.2
    policy_sorted = sorted([3.0, -2.0, 0.5])  # policy chosen - rejected
    ref_sorted = sorted([-1.0, 1.0, 0.0])
    expected = [reference_loss("cdpo", p, 0.0, r, 0.0, beta, eps, 1, 1) for p, r in zip(policy_sorted, ref_sorted)]
    out = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, loss_type="aot",
                   label_smoothing=eps)
    torch.testing.assert_close(out.losses.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)

    chosen_sorted = sorted([1.0, -3.0, 0.0])  # chosen log-ratios
    rejected_sorted = sorted([-3.0, 0.0, -0.5])
    expected = [reference_loss("cdpo", c, r, 0.0, 0.0, beta, eps, 1, 1) for c, r in zip(chosen_sorted, rejected_sorted)]
    out = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, loss_type="aot_unpaired",
                   label_smoothing=eps)
    torch.testing.assert_close(out.losses.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)


def test_zero_smoothing_reduces_to_sigmoid():
    inputs = (torch.tensor([-3.0, -8.0]), torch.tensor([-4.0, -2.0]), torch.tensor([-3.5, -7.0]),
              torch.tensor([-3.0, -2.5]))
    sigmoid = dpo_loss(*inputs, beta=0.3).losses
    for loss_type in ("cdpo", "robust"):
        torch.testing.assert_close(dpo_loss(*inputs, beta=0.3, loss_type=loss_type).losses, sigmoid)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_gradient_flows_only_into_policy_inputs(loss_type):
    policy_chosen = torch.tensor([-3.0, -8.0, -6.0], requires_grad=True)
    policy_rejected = torch.tensor([-4.0, -2.0, -6.5], requires_grad=True)
    ref_chosen = torch.tensor([-3.5, -7.0, -6.0], requires_grad=True)  # e.g. a live reference run without no_grad
    ref_rejected = torch.tensor([-3.0, -2.5, -7.0], requires_grad=True)
    lengths = torch.tensor([3.0, 2.0, 4.0], requires_grad=True)
    out = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type=loss_type,
                   label_smoothing=SMOOTHING.get(loss_type, 0.1 if loss_type.startswith("aot") else 0.0),
                   chosen_lengths=lengths, rejected_lengths=lengths)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    grads = torch.autograd.grad(out.loss, (policy_chosen, policy_rejected, ref_chosen, ref_rejected, lengths),
                                allow_unused=True)
    assert grads[0] is not None and grads[1] is not None
    assert grads[0].abs().sum() + grads[1].abs().sum() > 0
    assert grads[2] is None and grads[3] is None and grads[4] is None


def test_lower_precision_inputs():
    inputs = [t.bfloat16() for t in golden_inputs()]
    out = dpo_loss(*inputs, beta=0.1)
    assert out.losses.dtype == torch.bfloat16
    assert abs(out.losses.float().item() - 0.5981389) < 1e-2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"loss_type": "kto"}, ValueError, r"'kto'.*allowed: sigmoid, cdpo, hinge, ipo, robust"),
        ({"loss_type": "sigmoid", "label_smoothing": 0.1}, ValueError, r"label_smoothing=0.1.*'sigmoid'.*cdpo"),
        ({"loss_type": "hinge", "label_smoothing": 0.2}, ValueError, r"label_smoothing=0.2.*'hinge'.*robust"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, ValueError, r"\[0.0, 0.5\), got 0.5 for loss_type='robust'"),
        ({"loss_type": "cdpo", "label_smoothing": -0.1}, ValueError, r"\[0.0, 0.5\), got -0.1"),
        ({"loss_type": "exo_pair", "label_smoothing": 0.0}, ValueError, r"\(0.0, 1.0\), got 0.0.*1e-3"),
        ({"label_smoothing": float("nan")}, ValueError, "label_smoothing.*nan"),
        ({"label_smoothing": "0.1"}, TypeError, "label_smoothing.*'0.1'"),
        ({"beta": 0.0}, ValueError, r"beta.*\(0.0, inf\), got 0.0"),
        ({"beta": -0.1}, ValueError, r"beta.*got -0.1"),
        ({"beta": float("inf")}, ValueError, "beta.*inf"),
        ({"loss_type": "ipo"}, ValueError, "chosen_lengths=.*rejected_lengths=.*num_tokens"),
        ({"loss_type": "sigmoid_norm", "chosen_lengths": torch.ones(2)}, ValueError, "rejected_lengths="),
        ({"loss_type": "ipo", "chosen_lengths": torch.ones(3), "rejected_lengths": torch.ones(2)}, ValueError,
         r"chosen_lengths.*\(2,\).*\(3,\)"),
        ({"loss_type": "ipo", "chosen_lengths": -torch.ones(2), "rejected_lengths": torch.ones(2)}, ValueError,
         "non-negative.*-1"),
        ({"loss_type": "discopop", "discopop_tau": 0.0}, ValueError, "discopop_tau"),
    ],
)
def test_configuration_errors(kwargs, error, match):
    pairs = (torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(error, match=match):
        dpo_loss(*pairs, **kwargs)


@pytest.mark.parametrize(
    ("position", "value", "error", "match"),
    [
        (0, torch.zeros(2, 1), ValueError, r"policy_chosen_logps.*\(2, 1\).*squeeze"),
        (1, torch.zeros(3), ValueError, "policy_rejected_logps.*3 entries.*2 pairs"),
        (2, torch.zeros(2, dtype=torch.long), TypeError, "ref_chosen_logps.*floating.*int64"),
        (3, [0.0, 0.0], TypeError, "ref_rejected_logps.*torch.Tensor.*list"),
        (0, torch.tensor(0.0), ValueError, r"policy_chosen_logps.*\(batch,\).*\(\)"),
    ],
)
def test_shape_and_dtype_errors(position, value, error, match):
    pairs = [torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2)]
    pairs[position] = value
    with pytest.raises(error, match=match):
        dpo_loss(*pairs)


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="empty batch"):
        dpo_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0))
