"""Gradient helpers over .grad and FP8 side-channel gradients: inf/NaN detection and clipping, against torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_plugins.fp8 import ScaledTensor, get_fp8_grad, quantize, set_fp8_grad
from lightning_plugins.precision.grads import clip_grad_norm_, clip_grad_value_, grads_nonfinite, total_grad_norm


def _params(seed=0):
    """Two params with .grad, two with an E4M3 side-channel gradient; plus fp32 copies of all four gradients."""
    g = torch.Generator().manual_seed(seed)
    hp = [nn.Parameter(torch.randn(8, generator=g)) for _ in range(2)]
    fp8 = [nn.Parameter(torch.randn(16, 16, generator=g)) for _ in range(2)]
    for p in hp:
        p.grad = torch.randn(p.shape, generator=g) * 3
    for p in fp8:
        q, _ = quantize(torch.randn(p.shape, generator=g), "e4m3")
        set_fp8_grad(p, q)
    dense = [p.grad.clone() for p in hp] + [get_fp8_grad(p).dequantize() for p in fp8]
    return hp + fp8, dense


def _current(params):
    return [p.grad if p.grad is not None else get_fp8_grad(p).dequantize() for p in params]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_grad_norm_matches_torch(norm_type):
    params, dense = _params()
    reference = [nn.Parameter(torch.zeros_like(d)) for d in dense]
    for r, d in zip(reference, dense):
        r.grad = d.clone()
    expected = torch.nn.utils.clip_grad_norm_(reference, 1.0, norm_type)
    assert float(total_grad_norm(params, norm_type)) == pytest.approx(float(expected), rel=1e-6)
    total = clip_grad_norm_(params, 1.0, norm_type)
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    for got, ref in zip(_current(params), reference):
        torch.testing.assert_close(got, ref.grad, rtol=1e-6, atol=0)
    # the FP8 payload is untouched: only scale_inv carries the clipping coefficient
    q, _ = quantize(dense[2], "e4m3")
    assert torch.equal(get_fp8_grad(params[2]).data.view(torch.uint8), q.data.view(torch.uint8))


def test_clip_grad_norm_below_the_limit_changes_nothing():
    params, dense = _params()
    clip_grad_norm_(params, 1e6)
    for got, ref in zip(_current(params), dense):
        assert torch.equal(got, ref)


def test_clip_grad_value():
    params, dense = _params()
    clip_grad_value_(params, 0.5)
    for got, ref in zip(_current(params), dense):
        assert got.abs().max() <= 0.5
        assert torch.equal(got, ref.clamp(-0.5, 0.5))  # exact: unclamped E4M3 values survive requantization
    assert get_fp8_grad(params[2]).data.dtype == torch.float8_e4m3fn


def test_nonfinite_detection():
    params, _ = _params()
    assert not bool(grads_nonfinite(params))
    params[0].grad[3] = float("inf")
    assert bool(grads_nonfinite(params))
    params, _ = _params()
    g = get_fp8_grad(params[3])
    set_fp8_grad(params[3], ScaledTensor(g.data, torch.tensor(float("nan"))))
    assert bool(grads_nonfinite(params))
    # value clipping must not hide a non-finite FP8 gradient
    clip_grad_value_(params, 0.5)
    assert bool(grads_nonfinite(params))
    assert not bool(grads_nonfinite([nn.Parameter(torch.zeros(2))]))


def test_nonfinite_detection_over_mixed_dtypes_and_sparse_grads_leaves_values_alone():
    fp32, bf16 = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    fp32.grad = torch.tensor([1.0, -2.0, 3.0, 0.5])
    bf16.grad = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    sparse = nn.Parameter(torch.zeros(5))
    sparse.grad = torch.sparse_coo_tensor([[1, 3]], [1.0, 2.0], (5,))
    before = [fp32.grad.clone(), bf16.grad.clone()]
    assert not bool(grads_nonfinite([fp32, bf16, sparse]))
    assert torch.equal(fp32.grad, before[0]) and torch.equal(bf16.grad, before[1])
    bf16.grad[1] = float("nan")
    assert bool(grads_nonfinite([fp32, bf16, sparse]))
    bf16.grad[1] = 0.0
    sparse.grad = torch.sparse_coo_tensor([[2]], [float("inf")], (5,))
    assert bool(grads_nonfinite([fp32, bf16, sparse]))
