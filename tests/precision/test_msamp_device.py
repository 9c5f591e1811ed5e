"""A Trainer run on the hardware FP8 path follows the same run on the CPU emulation (the emulation's promise):
``MSAMPPrecision`` O1/O2 with ``torch._scaled_mm`` on a CUDA GPU with FP8 tensor cores (and on the CPU where torch
has a kernel for it) vs ``backend="emulated"`` on the CPU, same seed and data. The CUDA cases run in a GPU session
(``benchmarks/gpu_fp8.sh``) and are skipped elsewhere."""

from __future__ import annotations

import pytest
import torch
from fp8_support import requires_cpu_scaled_mm, requires_fp8_cuda
from precision_helpers import fit

from lightning_plugins import MSAMPPrecision
from lightning_plugins.fp8 import FP8AdamW, FP8Linear

STEPS = 30
DEVICE_PATHS = [
    pytest.param("cpu", "torch", marks=requires_cpu_scaled_mm, id="cpu-scaled_mm"),
    pytest.param("cuda", "auto", marks=requires_fp8_cuda, id="cuda-auto"),
]


@pytest.fixture(scope="module")
def emulated_losses(quiet_lightning):
    return {level: fit(plugins=[MSAMPPrecision(level=level, backend="emulated")], steps=STEPS)[0].losses
            for level in ("O1", "O2")}


@pytest.mark.parametrize(("device", "backend"), DEVICE_PATHS)
@pytest.mark.parametrize("level", ["O1", "O2"])
def test_training_on_device_follows_the_cpu_emulation(device, backend, level, emulated_losses):
    # compute_dtype float32: the non-FP8 ops as in the CPU reference (on CUDA the default would be bf16 autocast);
    # deterministic=False: on CUDA, deterministic mode needs CUBLAS_WORKSPACE_CONFIG (and changes nothing here)
    plugin = MSAMPPrecision(level=level, backend=backend, compute_dtype="float32")
    model, trainer = fit(plugins=[plugin], steps=STEPS, accelerator=device, deterministic=False)
    losses, reference = model.losses, emulated_losses[level]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert sum(isinstance(m, FP8Linear) for m in model.modules()) == 3
    assert next(model.parameters()).device.type == device
    # measured on the CPU (same kernels): identical; on a GPU only the accumulation order differs
    assert max(abs(a - b) for a, b in zip(losses, reference)) < 0.05
    assert abs(sum(losses[-5:]) - sum(reference[-5:])) / sum(reference[-5:]) < 0.02
    if level == "O2":
        optimizer = trainer.optimizers[0]
        assert isinstance(optimizer, FP8AdamW)
        states = [s for s in optimizer.state.values() if "exp_avg" in s]
        assert states and all(s["exp_avg"].device.type == device for s in states)
        assert {s["exp_avg"].element_size() for s in states} == {1}  # E4M3 first moment on the device


def test_emulated_reference_learns(emulated_losses):
    for losses in emulated_losses.values():
        assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
