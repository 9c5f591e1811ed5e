"""Helpers shared by the FP8 tests (importable from every test folder: tests/ holds the root conftest)."""

import pytest
import torch

from lightning_plugins.fp8.gemm import resolve_backend_name


def scaled_mm_runs_on_cpu() -> bool:
    """True if this torch has a CPU kernel for ``torch._scaled_mm`` (torch >= 2.10)."""
    try:
        one = torch.ones(1, dtype=torch.float32)
        torch._scaled_mm(
            torch.zeros(16, 16).to(torch.float8_e4m3fn),
            torch.zeros(16, 16).to(torch.float8_e4m3fn).t(),
            scale_a=one,
            scale_b=one,
            out_dtype=torch.float32,
        )
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def fp8_cuda_available() -> bool:
    """True on a CUDA GPU whose FP8 GEMMs the ``auto`` backend uses (compute capability >= 8.9)."""
    return torch.cuda.is_available() and resolve_backend_name("auto", "cuda") == "torch"


requires_cpu_scaled_mm = pytest.mark.skipif(not scaled_mm_runs_on_cpu(), reason="torch._scaled_mm has no CPU kernel")
requires_fp8_cuda = pytest.mark.skipif(
    not fp8_cuda_available(), reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)"
)
