"""Formats, power-of-two scales (MS-AMP anchor vectors) and the amax-history state."""

import math

import pytest
import torch

from lightning_plugins.fp8 import (
    E4M3,
    E5M2,
    FP16,
    ScalingState,
    frozen_scaling,
    get_format,
    pow2_scale,
    update_scaling_states,
)


def ref_scale(amax: float, fp_max: float, margin: int = 0, prev: float = 1.0) -> float:
    """Independent float64 reference of MS-AMP's formula."""
    if amax <= 0 or not math.isfinite(amax):
        return prev
    return 2.0 ** (math.floor(math.log2(fp_max / amax)) - margin)


def test_format_maxima_match_torch():
    assert (E4M3.max, E5M2.max, FP16.max) == (448.0, 57344.0, 65504.0)
    for fmt in (E4M3, E5M2, FP16):
        assert torch.finfo(fmt.dtype).max == fmt.max
    assert E4M3.itemsize == E5M2.itemsize == 1
    assert get_format("E4M3") is E4M3 and get_format(torch.float8_e5m2) is E5M2


def test_get_format_errors_name_allowed_values():
    with pytest.raises(ValueError, match="allowed.*e4m3"):
        get_format("e3m4")
    with pytest.raises(ValueError, match="Unsupported scaled dtype"):
        get_format(torch.int8)
    with pytest.raises(TypeError):
        get_format(8)


@pytest.mark.parametrize(
    ("amax", "fmt", "margin", "expected"),
    [
        (10.0, "e4m3", 0, 32.0),  # MS-AMP test_meta.py anchors
        (1e4, "e4m3", 0, 1 / 32),
        (0.0, "e4m3", 0, 1.0),
        (448.0, "e4m3", 0, 1.0),
        (10.0, "e4m3", 1, 16.0),
        (10.0, "e4m3", 3, 4.0),
        (10.0, "e5m2", 0, 4096.0),  # 57344/10 = 5734.4 -> 2^12
        (1e5, "e5m2", 0, 0.5),
        (1e5, "e5m2", 2, 0.125),
        (10.0, "fp16", 0, 4096.0),  # 65504/10 -> 2^12
    ],
)
def test_pow2_scale_anchor_vectors(amax, fmt, margin, expected):
    assert pow2_scale(amax, fmt, margin=margin).item() == expected


def test_pow2_scale_keeps_previous_on_zero_or_nonfinite():
    amax = torch.tensor([0.0, float("inf"), float("nan"), -1.0])
    out = pow2_scale(amax, "e4m3", prev_scale=torch.tensor(8.0))
    assert out.tolist() == [8.0, 8.0, 8.0, 8.0]


def test_pow2_scale_matches_float64_reference_and_is_power_of_two():
    amaxes = [1e-30, 3e-7, 0.0123, 0.5, 1.0, 3.3, 97.0, 1234.5, 6.02e8]
    got = pow2_scale(torch.tensor(amaxes), 448.0)
    for amax, scale in zip(amaxes, got.tolist(), strict=True):
        assert scale == ref_scale(amax, 448.0)
        assert math.log2(scale) == int(math.log2(scale))
        assert amax * scale <= 448.0


def test_pow2_scale_bad_arguments():
    with pytest.raises(ValueError, match="margin"):
        pow2_scale(1.0, "e4m3", margin=-1)
    with pytest.raises(ValueError, match="fp_max"):
        pow2_scale(1.0, 0.0)


def test_scaling_state_validates_arguments():
    with pytest.raises(ValueError, match="history_len"):
        ScalingState("e4m3", history_len=0)
    with pytest.raises(ValueError, match="margin"):
        ScalingState("e4m3", margin=1.5)


def _step(state: ScalingState, amax: float) -> float:
    scale = state.scale_for(torch.tensor(amax)).item()
    state.update()
    return scale


def test_jit_during_warmup_then_delayed():
    state = ScalingState("e4m3", history_len=4)
    # warm-up: each cast uses the scale of its own amax
    for amax in (10.0, 100.0, 1.0, 5.0):
        assert state.in_warmup
        assert _step(state, amax) == ref_scale(amax, 448.0)
    assert not state.in_warmup and int(state.counter) == 4
    # delayed: the scale in use comes from the window (max 100 -> 4), not from the current amax
    assert _step(state, 1000.0) == ref_scale(100.0, 448.0) == 4.0
    # the 1000 recorded in that step now sets the scale
    assert state.scale.item() == ref_scale(1000.0, 448.0) == 0.25


def test_window_tracks_max_of_last_n_steps():
    n = 16
    state = ScalingState("e4m3", history_len=n)
    amaxes = [float(v) for v in torch.rand(40, generator=torch.Generator().manual_seed(0)) * 300 + 1]
    for i, amax in enumerate(amaxes):
        state.scale_for(torch.tensor(amax))
        state.update()
        window = amaxes[max(0, i - n + 1) : i + 1]
        assert state.scale.item() == ref_scale(max(window), 448.0)


def test_batched_update_of_mixed_states_tracks_each_window():
    # one update_scaling_states call over states of different formats, windows and margins (grouped internally)
    specs = [("e4m3", 16, 0), ("e5m2", 4, 0), ("e4m3", 1, 0), ("e4m3", 4, 2), ("e5m2", 16, 0)]
    states = [ScalingState(fmt, history_len=n, margin=margin) for fmt, n, margin in specs]
    g = torch.Generator().manual_seed(3)
    amaxes = (torch.rand(30, len(specs), generator=g) * 1000 + 1e-3).tolist()
    for i, row in enumerate(amaxes):
        for state, amax in zip(states, row):
            state.scale_for(torch.tensor(amax))
        update_scaling_states(states)
        for j, ((fmt, n, margin), state) in enumerate(zip(specs, states)):
            window = [r[j] for r in amaxes[max(0, i - n + 1) : i + 1]]
            assert state.scale.item() == ref_scale(max(window), get_format(fmt).max, margin), (i, j)
            assert int(state.counter) == min(i + 1, n)


def test_window_two_leaves_jit_after_two_updates():  # MS-AMP test_meta.py
    state = ScalingState("e4m3", history_len=2)
    assert state.in_warmup
    _step(state, 1.0)
    assert state.in_warmup
    _step(state, 1.0)
    assert not state.in_warmup
    assert ScalingState("e4m3", history_len=1).in_warmup  # window 1 is always JIT


def test_nonfinite_amax_is_counted_and_restarts_warmup():
    state = ScalingState("e4m3", history_len=2)
    for _ in range(3):
        _step(state, 10.0)
    assert not state.in_warmup and state.scale.item() == 32.0
    state.scale_for(torch.tensor(float("inf")))
    assert int(state.nonfinite_count) == 1
    state.update()
    assert state.in_warmup and int(state.counter) == 0 and int(state.nonfinite_count) == 0
    assert state.scale.item() == 32.0  # inf dropped, window max 10 still valid
    assert torch.isfinite(state.amax_history).all()


def test_frozen_scaling_records_nothing():
    state = ScalingState("e4m3", history_len=4)
    _step(state, 10.0)
    before = {k: v.clone() for k, v in state.get_scaling_state().items() if isinstance(v, torch.Tensor)}
    with frozen_scaling():
        assert state.scale_for(torch.tensor(1.0)).item() == 256.0  # JIT scale for this tensor
        state.scale_for(torch.tensor(float("nan")))
        state.update()
    after = state.get_scaling_state()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert int(state.nonfinite_count) == 0


def test_state_round_trip_and_mismatch():
    a = ScalingState("e5m2", history_len=3)
    for amax in (3.0, 7.0):
        _step(a, amax)
    b = ScalingState("e5m2", history_len=3)
    b.set_scaling_state(a.get_scaling_state())
    assert torch.equal(a.scale, b.scale) and torch.equal(a.amax_history, b.amax_history)
    assert torch.equal(a.counter, b.counter)
    with pytest.raises(ValueError, match="history_len"):
        ScalingState("e5m2", history_len=4).set_scaling_state(a.get_scaling_state())


def test_state_ignores_dtype_casts():
    state = ScalingState("e4m3")
    state.scale.fill_(2.0**20)
    state.half()
    assert state.scale.dtype == torch.float32 and state.scale.item() == 2.0**20


def test_window_one_stays_just_in_time_after_updates():
    state = ScalingState("e4m3", history_len=1)
    for amax in (10.0, 1000.0, 0.5, 3.0):
        assert _step(state, amax) == ref_scale(amax, 448.0)
    assert int(state.counter) == 1 and state.in_warmup
