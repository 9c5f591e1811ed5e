"""FP8Linear: accuracy vs nn.Linear, FP8-saved activations, scaling behaviour, side-channel grads, errors."""

import copy
import pickle
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers the tensor reductions ForkingPickler uses)
from torch import nn

from lightning_plugins.fp8 import FP8Linear, ScalingRegistry, clear_fp8_grads, frozen_scaling, get_fp8_grad


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.double(), approx.double()
    return (20 * torch.log10(ref.norm() / (ref - approx).norm())).item()


def _pair(in_f=128, out_f=64, seed=0, **kwargs):
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f)
    fp8 = FP8Linear(in_f, out_f, **kwargs)
    fp8.load_state_dict(ref.state_dict())
    return ref, fp8


def _fwd_bwd(layer, x, dy):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y, x.grad


def test_sqnr_vs_nn_linear_on_random_data():
    ref, fp8 = _pair()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, 128, generator=g)
    dy = torch.randn(4, 64, 64, generator=g)
    y_ref, dx_ref = _fwd_bwd(ref, x, dy)
    y, dx = _fwd_bwd(fp8, x, dy)
    out_db, dw_db, dx_db = sqnr_db(y_ref, y), sqnr_db(ref.weight.grad, fp8.weight.grad), sqnr_db(dx_ref, dx)
    print(f"\nFP8Linear SQNR: output {out_db:.1f} dB, weight grad {dw_db:.1f} dB, input grad {dx_db:.1f} dB")
    assert out_db >= 25.0
    assert dw_db >= 17.0
    assert dx_db >= 17.0
    assert torch.equal(fp8.bias.grad, ref.bias.grad)  # bias stays in high precision
    assert fp8.weight.grad.dtype == torch.float32


def test_small_layer_atol_msamp_anchor():
    ref, fp8 = _pair(4, 4, seed=3)
    x = torch.randn(4, 4)
    torch.testing.assert_close(fp8(x), ref(x), rtol=0, atol=0.1)


def test_weight_grad_is_rounded_through_e4m3():
    _, fp8 = _pair()
    x = torch.randn(32, 128)
    fp8(x).sum().backward()
    scale = 1 / (fp8.wgrad_scaling.scale)
    grid = fp8.weight.grad / scale  # values on the E4M3 grid, exactly representable
    assert torch.equal(grid.to(torch.float8_e4m3fn).float(), grid)


def test_saved_activations_are_one_byte_per_element():
    _, fp8 = _pair()
    ref = nn.Linear(128, 64)
    x = torch.randn(3, 16, 128, requires_grad=True)

    def saved_by(layer):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            layer(x)
        return saved

    ref_big = [t for t in saved_by(ref) if t.numel() == x.numel()]
    assert ref_big and all(t.element_size() == 4 for t in ref_big)  # what nn.Linear keeps
    saved = saved_by(fp8)
    big = [t for t in saved if t.numel() > 1]
    assert {tuple(t.shape) for t in big} == {(48, 128), (64, 128)}  # input and weight
    assert all(t.element_size() == 1 and t.dtype == torch.float8_e4m3fn for t in big)
    assert sum(t.numel() * t.element_size() for t in saved) == x.numel() + 64 * 128 + 2 * 4


def test_output_dtype_follows_autocast_and_input():
    _, fp8 = _pair()
    x = torch.randn(8, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8(x)
    assert y.dtype == torch.bfloat16
    fp8_bf16 = fp8.to(torch.bfloat16)
    y = fp8_bf16(x.bfloat16())
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert fp8_bf16.weight.grad.dtype == torch.bfloat16
    assert fp8_bf16.input_scaling.scale.dtype == torch.float32  # scaling state is never cast


def test_state_dict_is_plain_linear_both_ways():
    ref, fp8 = _pair()
    assert list(fp8.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    plain = nn.Linear(128, 64)
    plain.load_state_dict(fp8.state_dict())  # strict
    assert torch.equal(plain.weight, ref.weight)
    no_bias = FP8Linear(128, 64, bias=False)
    no_bias.load_state_dict(nn.Linear(128, 64, bias=False).state_dict())


def test_amax_recorded_only_in_training_steps():
    _, fp8 = _pair()
    registry = ScalingRegistry(nn.Sequential(fp8))
    x = torch.randn(8, 128)
    fp8(x).sum().backward()
    registry.update()
    snapshot = {k: s.get_scaling_state() for k, s in registry.states().items()}

    def unchanged():
        for key, state in registry.states().items():
            now = state.get_scaling_state()
            for field in ("scale", "amax_history", "counter"):
                if not torch.equal(snapshot[key][field], now[field]):
                    return False
        return True

    big = x * 1000
    fp8.eval()
    fp8(big)
    assert unchanged()
    fp8.train()
    with torch.no_grad():
        fp8(big)
    assert unchanged()
    with frozen_scaling():
        fp8(big).sum().backward()  # grad_output cast in backward is frozen too
    assert unchanged()
    fp8(big).sum().backward()
    assert not unchanged()


def test_delayed_scaling_end_to_end():
    _, fp8 = _pair(amax_history_len=4)
    registry = ScalingRegistry(nn.Sequential(fp8))
    for _ in range(5):
        fp8(torch.randn(8, 128)).sum().backward()
        registry.update()
    assert not fp8.input_scaling.in_warmup and not fp8.grad_output_scaling.in_warmup
    assert fp8.weight_scaling.in_warmup and fp8.wgrad_scaling.in_warmup  # always just-in-time
    # delayed: a 4x larger input is quantized with the old scale (and saturates), amax is recorded
    old = fp8.input_scaling.scale.item()
    fp8(torch.randn(8, 128) * 4).sum().backward()
    assert fp8.input_scaling.scale.item() == old
    registry.update()
    assert fp8.input_scaling.scale.item() < old


def test_nonfinite_forward_and_backward_are_flagged_not_hidden():
    _, fp8 = _pair()
    registry = ScalingRegistry(nn.Sequential(fp8))
    x = torch.randn(8, 128)
    x[0, 0] = float("inf")
    y = fp8(x)
    assert torch.isnan(y).all()
    assert bool(registry.found_nonfinite()) and registry.nonfinite_layers() == ["0.input"]
    registry.update()
    assert not bool(registry.found_nonfinite()) and fp8.input_scaling.in_warmup

    xg = torch.randn(8, 128, requires_grad=True)
    dy = torch.ones(8, 64)
    dy[3, 5] = float("inf")
    fp8(xg).backward(dy)
    assert torch.isnan(xg.grad).all() and torch.isnan(fp8.weight.grad).all()
    assert "0.grad_output" in registry.nonfinite_layers()


def test_fp8_weight_grad_side_channel_and_accumulation():
    ref, fp8 = _pair(wgrad_mode="fp8")
    x1, x2 = torch.randn(16, 128), torch.randn(16, 128)
    for x in (x1, x2):
        ref(x).sum().backward()
        fp8(x).sum().backward()
    assert fp8.weight.grad is None and fp8.bias.grad is not None
    grad = get_fp8_grad(fp8.weight)
    assert grad.data.dtype == torch.float8_e4m3fn and grad.data.element_size() == 1
    assert grad.data.shape == fp8.weight.shape
    assert sqnr_db(ref.weight.grad, grad.dequantize()) >= 17.0
    clear_fp8_grads(fp8)
    assert get_fp8_grad(fp8.weight) is None


def test_fp8_weight_grad_survives_zero_grad_between_forward_and_backward():
    # Lightning's order: forward, zero_grad, backward. The gradient appears during backward, like .grad.
    ref, fp8 = _pair(wgrad_mode="fp8")
    x = torch.randn(16, 128)
    fp8(torch.randn(16, 128)).sum().backward()  # a stale gradient that zero_grad must discard
    y = fp8(x)
    clear_fp8_grads(fp8)
    assert get_fp8_grad(fp8.weight) is None
    y.sum().backward()
    ref(x).sum().backward()
    assert sqnr_db(ref.weight.grad, get_fp8_grad(fp8.weight).dequantize()) >= 17.0


def test_fp8_weight_grad_of_a_layer_applied_twice_sums_both_uses():
    ref, fp8 = _pair(64, 64, wgrad_mode="fp8")
    x = torch.randn(32, 64)
    ref(torch.tanh(ref(x))).sum().backward()
    fp8(torch.tanh(fp8(x))).sum().backward()
    assert sqnr_db(ref.weight.grad, get_fp8_grad(fp8.weight).dequantize()) >= 17.0


def test_fp8_weight_grad_not_attached_to_a_frozen_weight():
    _, fp8 = _pair(wgrad_mode="fp8")
    fp8.weight.requires_grad_(False)
    x = torch.randn(4, 128, requires_grad=True)
    fp8(x).sum().backward()
    assert x.grad is not None and get_fp8_grad(fp8.weight) is None


def test_fp8_weight_grad_goes_to_the_copy_after_deepcopy_and_pickling():
    _, fp8 = _pair(wgrad_mode="fp8")
    deep = copy.deepcopy(fp8)
    unpickled = pickle.loads(ForkingPickler.dumps(fp8))  # as ddp_spawn sends a model to its processes
    for layer in (deep, unpickled):
        layer(torch.randn(4, 128)).sum().backward()
        assert get_fp8_grad(layer.weight) is not None
    assert get_fp8_grad(fp8.weight) is None  # the original's weight got nothing


def test_fp8_weight_grad_after_dtype_and_device_moves():
    _, fp8 = _pair(wgrad_mode="fp8")
    fp8.to(torch.bfloat16).to("cpu")
    assert fp8.weight.dtype == torch.bfloat16 and fp8.wgrad_slot.data.dtype == torch.float8_e4m3fn
    fp8(torch.randn(4, 128, dtype=torch.bfloat16)).sum().backward()
    grad = get_fp8_grad(fp8.weight)
    assert grad.data.dtype == torch.float8_e4m3fn and torch.isfinite(grad.dequantize()).all()
    assert grad.dequantize().abs().sum() > 0


def test_fp8_side_channel_poisoned_on_nonfinite():
    _, fp8 = _pair(wgrad_mode="fp8")
    dy = torch.ones(4, 64)
    dy[0, 0] = float("nan")
    fp8(torch.randn(4, 128)).backward(dy)
    assert torch.isnan(get_fp8_grad(fp8.weight).dequantize()).all()
    clear_fp8_grads(fp8)  # the skipped step drops it: the next gradient is clean
    fp8(torch.randn(4, 128)).sum().backward()
    assert torch.isfinite(get_fp8_grad(fp8.weight).dequantize()).all()


def test_from_linear_reuses_parameters_and_attributes():
    lin = nn.Linear(32, 16)
    lin.my_tag = "keep-me"
    fp8 = FP8Linear.from_linear(lin, backend="emulated", amax_history_len=8)
    assert fp8.weight is lin.weight and fp8.bias is lin.bias
    assert fp8.my_tag == "keep-me" and fp8.input_scaling.history_len == 8
    assert fp8.input_scaling.scale.device == lin.weight.device and not fp8.input_scaling.scale.is_meta


def test_explicit_torch_backend_on_cpu_matches_emulated():
    ref, emu = _pair(backend="emulated")
    _, tor = _pair(backend="torch")
    x = torch.randn(8, 128)
    try:
        y_torch = tor(x)
    except RuntimeError as err:
        pytest.skip(f"torch._scaled_mm unavailable on CPU: {err}")
    assert torch.equal(y_torch, emu(x))


def test_bad_inputs_give_clear_errors():
    _, fp8 = _pair()
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 128\)"):
        fp8(torch.randn(4, 127))
    with pytest.raises(TypeError, match="dtype"):
        fp8(torch.ones(4, 128, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype"):
        fp8(torch.ones(4, 128, dtype=torch.float64))
    with pytest.raises(ValueError, match="allowed"):
        FP8Linear(16, 16, backend="fast")
    with pytest.raises(ValueError, match="wgrad_mode"):
        FP8Linear(16, 16, wgrad_mode="bf16")
    with pytest.raises(ValueError, match="in_features"):
        FP8Linear(0, 16)
    with pytest.raises(TypeError, match="nn.Linear"):
        FP8Linear.from_linear(nn.Conv1d(2, 2, 1))
