"""Saturating quantization, non-finite detection before the cast, exact dequantization."""

import pytest
import torch

from lightning_plugins.fp8 import ScalingState, dequantize, quantize, quantize_with_state


def test_e4m3_round_trip_hand_computed():
    x = torch.tensor([1.0, 0.3, -2.5, 10.0, 0.1])
    q, bad = quantize(x, "e4m3")
    # amax 10 -> scale 32. In E4M3, [8,16) has step 1 and [2,4) step 0.25:
    # 0.3*32 = 9.6 -> 10 -> 0.3125 ; 0.1*32 = 3.2 -> 3.25 -> 0.1015625 ; the others are exact.
    assert q.scale_inv.item() == 1 / 32 and q.data.dtype == torch.float8_e4m3fn
    assert q.dequantize().tolist() == [1.0, 0.3125, -2.5, 10.0, 0.1015625]
    assert not bad


def test_e5m2_round_trip_hand_computed():
    x = torch.tensor([10.0, 3.0, 0.3])
    q, _ = quantize(x, "e5m2")
    # amax 10 -> scale 4096; 0.3*4096 = 1228.8 in [1024,2048) (step 256) -> 1280 -> 0.3125
    assert q.scale_inv.item() == 1 / 4096
    assert q.dequantize().tolist() == [10.0, 3.0, 0.3125]


def test_uniform_round_trip_atol_msamp_anchor():
    x = torch.rand(1000, generator=torch.Generator().manual_seed(0)).half()
    q, _ = quantize(x, "e4m3")
    torch.testing.assert_close(q.dequantize(torch.float16), x, rtol=0, atol=0.1)


def test_dequantize_is_exact():
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) * 37
    q, _ = quantize(x, "e4m3")
    scale = 1 / q.scale_inv
    assert torch.equal(q.dequantize() * scale, q.data.float())
    assert torch.equal(dequantize(q.data, q.scale_inv, torch.bfloat16), q.dequantize().bfloat16())


def test_saturates_instead_of_overflowing():
    q, bad = quantize(torch.tensor([1000.0, -1000.0, 1.0]), "e4m3", scale=1.0)
    assert q.dequantize().tolist() == [448.0, -448.0, 1.0] and not bad
    # a plain cast of 1e6 to E5M2 gives inf; the saturating quantize gives the max
    assert torch.isinf(torch.tensor(1e6).to(torch.float8_e5m2).float())
    q, bad = quantize(torch.tensor([1e6]), "e5m2", scale=1.0)
    assert q.dequantize().item() == 57344.0 and not bad


@pytest.mark.parametrize("bad_value", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_detected_before_the_cast(bad_value):
    x = torch.tensor([1.0, 2.0, bad_value])
    # the pitfall: an E4M3 cast loses inf (torch 2.14 gives 448, a finite value; torch 2.11 gives NaN)
    if bad_value == float("inf"):
        cast = torch.tensor(bad_value).to(torch.float8_e4m3fn).float()
        assert not torch.isinf(cast) and (cast.item() == 448.0 or torch.isnan(cast))
    q, bad = quantize(x, "e4m3")
    assert bool(bad)
    assert q.scale_inv.item() == 1.0  # non-finite amax keeps the previous (default) scale


def test_quantize_with_state_records_and_flags():
    state = ScalingState("e4m3", history_len=4)
    q, bad = quantize_with_state(torch.tensor([2.0, -7.0]), state)
    assert state.amax_history[0].item() == 7.0 and state.scale.item() == 64.0 and not bad
    _, bad = quantize_with_state(torch.tensor([float("nan")]), state)
    assert bool(bad) and int(state.nonfinite_count) == 1
    _, _ = quantize_with_state(torch.tensor([100.0]), state, record=False)
    assert state.scale.item() == 64.0  # not recorded


def test_fp16_input_with_large_scale_does_not_overflow():
    x = torch.tensor([1e-3, -2e-3], dtype=torch.float16)
    q, _ = quantize(x, "e4m3")
    torch.testing.assert_close(q.dequantize(torch.float16), x, rtol=0.07, atol=0)


def test_bad_inputs():
    with pytest.raises(TypeError, match="dtype"):
        quantize(torch.tensor([1, 2]), "e4m3")
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize([1.0], "e4m3")
    with pytest.raises(ValueError, match="scalar"):
        quantize(torch.ones(3), "e4m3", scale=torch.ones(2))
    with pytest.raises(ValueError, match="allowed"):
        quantize(torch.ones(3), "int8")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_table_conversion_is_torchs_cast_bit_for_bit(dtype):
    from lightning_plugins.fp8.quantize import to_float32

    every_byte = torch.arange(256, dtype=torch.uint8).view(dtype)
    expected = every_byte.to(torch.float32)
    got = to_float32(every_byte)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))  # NaN payloads and -0.0 included
    strided = every_byte.reshape(16, 16).t()  # a non-contiguous view keeps its shape and values
    assert torch.equal(to_float32(strided).view(torch.int32), strided.to(torch.float32).view(torch.int32))
    assert to_float32(torch.ones(3)).dtype == torch.float32
    # a tensor converted in several chunks (and a last, partial one), non-contiguous too
    large = torch.randint(0, 256, (3 * 2**16 + 1234,), dtype=torch.uint8).view(dtype).reshape(-1, 2)
    for tensor in (large, large.t()):
        assert torch.equal(to_float32(tensor).view(torch.int32), tensor.to(torch.float32).view(torch.int32))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "fp16"])
def test_quantize_many_equals_quantize_tensor_by_tensor(fmt):
    from lightning_plugins.fp8 import get_format
    from lightning_plugins.fp8.multi_tensor import dequantize_many, quantize_many_into

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(7, 5, generator=g) * 1e-3, torch.zeros(4), torch.randn(3, generator=g) * 1e6,
               torch.randn(2, 2, 2, generator=g)]
    datas = [torch.empty_like(t, dtype=get_format(fmt).dtype) for t in tensors]
    scale_invs = [torch.full((), 7.0) for _ in tensors]
    quantize_many_into(tensors, get_format(fmt), datas, scale_invs)
    for t, data, scale_inv in zip(tensors, datas, scale_invs):
        q, _ = quantize(t, fmt)
        assert torch.equal(data.view(torch.uint8) if data.element_size() == 1 else data,
                           q.data.view(torch.uint8) if q.data.element_size() == 1 else q.data)
        assert torch.equal(scale_inv, q.scale_inv)
    for got, data, scale_inv in zip(dequantize_many(datas, scale_invs), datas, scale_invs):
        assert torch.equal(got, dequantize(data, scale_inv))
