"""TrainingStateMeter: bytes per parameter of weights + gradients + optimizer state, measured inside a real run."""

from __future__ import annotations

import pytest
from precision_helpers import fit

from lightning_plugins.precision import MSAMPPrecision, TrainingStateMeter


def test_fp32_adamw_holds_16_bytes_per_parameter():
    meter = TrainingStateMeter()
    model, _ = fit(steps=3, callbacks=[meter])
    numel = sum(p.numel() for p in model.parameters())
    measured = meter.measured
    assert measured["numel"] == numel
    assert (measured["weights_Bpp"], measured["grads_Bpp"]) == (4.0, 4.0)
    assert (measured["exp_avg_Bpp"], measured["exp_avg_sq_Bpp"]) == (4.0, 4.0)
    # torch's AdamW keeps one fp32 `step` tensor per parameter tensor: 6 tensors
    assert measured["scales_step_other_Bpp"] == pytest.approx(6 * 4 / numel)


def test_o2_shrinks_every_kind_of_state():
    meter = TrainingStateMeter()
    fit(steps=3, plugins=[MSAMPPrecision(level="O2")], callbacks=[meter])
    measured = meter.measured
    assert measured["weight_dtypes"] == ["float16", "float32"]  # FP16 masters for FP8 layers, fp32 biases
    assert measured["weights_Bpp"] < 2.2 and measured["grads_Bpp"] < 1.2
    assert measured["exp_avg_Bpp"] < 1.2 and measured["exp_avg_sq_Bpp"] < 2.2
    assert measured["total_Bpp"] < 6.5


def test_at_step_must_leave_one_step_for_adam_state():
    with pytest.raises(ValueError, match="at_step must be an integer >= 1"):
        TrainingStateMeter(at_step=0)


def test_ms_amp_o1_memory_layout_is_o2_with_fp32_moments():
    """MS-AMP's O1 (FP16 weights, FP8 weight gradients, fp32 Adam moments: 11 B/param) is our O2 with fp32 moments;
    our O1 leaves weights, gradients and the optimizer untouched (any optimizer, 16 B/param)."""
    meter = TrainingStateMeter()
    fit(steps=3, plugins=[MSAMPPrecision(level="O2", exp_avg_dtype="fp32", exp_avg_sq_dtype="fp32")],
        callbacks=[meter])
    measured = meter.measured
    assert measured["weights_Bpp"] < 2.2 and measured["grads_Bpp"] < 1.2
    assert (measured["exp_avg_Bpp"], measured["exp_avg_sq_Bpp"]) == (4.0, 4.0)
    assert 10.9 < measured["total_Bpp"] < 11.5
    meter = TrainingStateMeter()
    fit(steps=3, plugins=[MSAMPPrecision(level="O1")], callbacks=[meter])
    assert meter.measured["total_Bpp"] > 16.0
