"""GEMM backends: emulated == dequantize-then-fp32-matmul, torch._scaled_mm on CPU, selection, errors."""

import sys

import pytest
import torch

import lightning_plugins.fp8.gemm as gemm
from lightning_plugins.fp8 import (
    BACKENDS,
    EmulatedBackend,
    ScaledTensor,
    TorchBackend,
    get_backend,
    quantize,
    resolve_backend_name,
)
from fp8_support import requires_cpu_scaled_mm


def _operands(m, k, n, fmt_a="e4m3", fmt_b="e4m3", seed=0):
    g = torch.Generator().manual_seed(seed)
    a, _ = quantize(torch.randn(m, k, generator=g) * 3, fmt_a)
    b, _ = quantize(torch.randn(k, n, generator=g) * 0.02, fmt_b)
    return a, b


def _reference(a, b):
    return (a.data.to(torch.float32) * a.scale_inv) @ (b.data.to(torch.float32) * b.scale_inv)


@pytest.mark.parametrize(("fmt_a", "fmt_b"), [("e4m3", "e4m3"), ("e5m2", "e4m3")])
def test_emulated_equals_dequantize_then_fp32_matmul(fmt_a, fmt_b):
    a, b = _operands(24, 40, 8, fmt_a, fmt_b)
    out = EmulatedBackend().mm(a, b)
    assert out.dtype == torch.float32
    assert torch.equal(out, _reference(a, b))
    assert torch.equal(EmulatedBackend().mm(a, b, torch.bfloat16), _reference(a, b).bfloat16())


def test_emulated_ignores_autocast():
    a, b = _operands(16, 32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = EmulatedBackend().mm(a, b)
    assert torch.equal(out, _reference(a, b))


@requires_cpu_scaled_mm
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize(("m", "k", "n", "fmt_a"), [(32, 64, 48, "e4m3"), (5, 40, 24, "e5m2"), (7, 30, 10, "e4m3")])
def test_torch_scaled_mm_on_cpu_matches_emulated_bitwise(pad, m, k, n, fmt_a):
    a, b = _operands(m, k, n, fmt_a)
    out = TorchBackend(pad_to_16=pad).mm(a, b)
    assert out.shape == (m, n)
    assert torch.equal(out, _reference(a, b))


@requires_cpu_scaled_mm
def test_torch_backend_accepts_transposed_operands():
    # the dW GEMM feeds dy^T (a non-contiguous view) as the left operand
    a, b = _operands(32, 48, 16)
    at = ScaledTensor(a.data.t().contiguous(), a.scale_inv).t()  # column-major a
    bt = ScaledTensor(b.data.t().contiguous(), b.scale_inv).t()  # column-major b (the fast layout)
    assert torch.equal(TorchBackend(pad_to_16=True).mm(at, bt), _reference(a, b))


def test_auto_selects_by_capability_never_by_name(monkeypatch):
    assert resolve_backend_name("auto", "cpu") == "emulated"
    assert isinstance(get_backend("auto", "cpu"), EmulatedBackend)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # A100 capability
    assert resolve_backend_name("auto", "cuda") == "emulated"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    for capability in [(8, 9), (9, 0), (10, 0)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert resolve_backend_name("auto", "cuda:0") == "torch"
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert resolve_backend_name("auto", "cuda") == "emulated"


def test_explicit_names_and_unknown_name():
    assert resolve_backend_name("EMULATED", "cpu") == "emulated"
    assert resolve_backend_name("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match=r"allowed: \['auto', 'torch', 'emulated', 'te'\]"):
        get_backend("cublas", "cpu")
    assert BACKENDS == ("auto", "torch", "emulated", "te")


def test_te_backend_clear_error_when_missing(monkeypatch):
    gemm._te_backend.cache_clear()
    # a None entry in sys.modules makes the import fail as if TE were not installed
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    with pytest.raises(RuntimeError, match="Transformer Engine.*not installed.*backend='torch'"):
        get_backend("te", "cpu")
    gemm._te_backend.cache_clear()


def test_gemm_bad_inputs():
    a, b = _operands(8, 16, 8)
    with pytest.raises(ValueError, match=r"\(M, K\) and b \(K, N\)"):
        EmulatedBackend().mm(a, a)
    with pytest.raises(TypeError, match="ScaledTensor"):
        EmulatedBackend().mm(a.data, b)
    with pytest.raises(ValueError, match="out_dtype"):
        EmulatedBackend().mm(a, b, torch.int32)
