"""FP8 optimizers: exact state-dict round trip, byte accounting, the sqrt(v) option, a small training run."""

import io
import math

import pytest
import torch
from torch import nn

from lightning_plugins.fp8 import (
    FP8AdamW,
    FP8Linear,
    ScalingRegistry,
    dequantize,
    fp8_linear_weights,
    optimizer_state_bytes,
    quantize,
    to_torch_adam_state_dict,
)


def _mlp(seed=0, wgrad_mode="fp8"):
    torch.manual_seed(seed)
    return nn.Sequential(
        FP8Linear(16, 32, wgrad_mode=wgrad_mode), nn.GELU(), nn.LayerNorm(32), FP8Linear(32, 8, wgrad_mode=wgrad_mode)
    )


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 16, generator=g)
    return x, torch.sin(x[:, :8]) + 0.5 * x[:, 8:]


def _train(model, opt, registry, steps, start=0):
    for step in range(start, start + steps):
        x, y = _batch(step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        registry.update()
    return loss.item()


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


STATE_OPTIONS = [
    {},  # MS-AMP O2: E4M3 m, FP16 v, FP16 master
    {"sqrt_exp_avg_sq": True, "master_weights": "fp16_scaled"},
    {"exp_avg_dtype": "fp16", "exp_avg_sq_dtype": "fp32", "master_weights": "fp32"},
]


@pytest.mark.parametrize("options", STATE_OPTIONS)
@pytest.mark.parametrize("wgrad_mode", ["fp8", "dequantized"])
def test_state_dict_round_trip_resumes_bit_exactly(options, wgrad_mode):
    model = _mlp(wgrad_mode=wgrad_mode)
    opt = FP8AdamW(model.parameters(), lr=1e-2, weight_decay=1e-3, model=model, **options)
    registry = ScalingRegistry(model)
    _train(model, opt, registry, 3)
    checkpoint = _roundtrip(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaling": registry.state_dict()}
    )
    _train(model, opt, registry, 3, start=3)  # the uninterrupted run

    fresh = _mlp(seed=123, wgrad_mode=wgrad_mode)
    fresh_opt = FP8AdamW(fresh.parameters(), lr=0.5, weight_decay=0.0, model=fresh, **options)
    fresh.load_state_dict(checkpoint["model"])
    fresh_opt.load_state_dict(checkpoint["optimizer"])
    fresh_registry = ScalingRegistry(fresh)
    fresh_registry.load_state_dict(checkpoint["scaling"])
    assert fresh_opt.param_groups[0]["lr"] == 1e-2 and fresh_opt.param_groups[0]["weight_decay"] == 1e-3
    _train(fresh, fresh_opt, fresh_registry, 3, start=3)

    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for p, q in zip(model.parameters(), fresh.parameters()):
        sa, sb = opt.state[p], fresh_opt.state[q]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, key
            assert torch.equal(
                sa[key].view(torch.uint8) if sa[key].dtype == torch.float8_e4m3fn else sa[key],
                sb[key].view(torch.uint8) if sb[key].dtype == torch.float8_e4m3fn else sb[key],
            ), key


def test_load_never_casts_states_to_the_param_dtype():
    model = _mlp()
    opt = FP8AdamW(model.parameters(), model=model)  # FP8Linear weights become fp16 masters
    _train(model, opt, ScalingRegistry(model), 1)
    saved = _roundtrip(opt.state_dict())
    weight = model[0].weight
    assert weight.dtype == torch.float16
    # torch's own loader casts floating states to the param dtype (the bug this class avoids) ...
    plain = FP8AdamW(model.parameters(), model=model)
    torch.optim.Optimizer.load_state_dict(plain, saved)
    assert plain.state[weight]["exp_avg"].dtype == torch.float16
    # ... ours keeps E4M3 / FP16 / fp32 scales as saved.
    fresh = FP8AdamW(model.parameters(), model=model)
    fresh.load_state_dict(saved)
    state = fresh.state[weight]
    assert state["exp_avg"].dtype == torch.float8_e4m3fn
    assert state["exp_avg_sq"].dtype == torch.float16
    assert state["exp_avg_scale_inv"].dtype == torch.float32 and state["step"].item() == 1


def test_state_dict_holds_only_plain_tensors_and_values():
    model = _mlp()
    opt = FP8AdamW(model.parameters(), model=model)
    _train(model, opt, ScalingRegistry(model), 1)
    state = opt.state_dict()["state"][0]
    assert sorted(state) == ["exp_avg", "exp_avg_scale_inv", "exp_avg_sq", "exp_avg_sq_scale_inv", "step"]
    assert all(type(v) is torch.Tensor for v in state.values())
    group = opt.state_dict()["param_groups"][0]
    assert (group["exp_avg_dtype"], group["exp_avg_sq_dtype"], group["master_weights"]) == ("e4m3", "fp16", "fp16")


def test_load_refuses_a_different_state_format():
    model = _mlp()
    opt = FP8AdamW(model.parameters(), model=model)
    _train(model, opt, ScalingRegistry(model), 1)
    other = FP8AdamW(model.parameters(), model=model, sqrt_exp_avg_sq=True)
    with pytest.raises(ValueError, match=r"sqrt_exp_avg_sq=False.*build the optimizer with sqrt_exp_avg_sq=False"):
        other.load_state_dict(opt.state_dict())


def test_torch_adamw_state_converts_both_ways():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(16, 16))
    twin = nn.Sequential(nn.Linear(16, 16))
    twin.load_state_dict(ref.state_dict())
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    for _ in range(3):
        ref(torch.randn(4, 16)).pow(2).sum().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    # torch AdamW state -> FP8AdamW (fp32 formats: exact) -> back to a torch AdamW state.
    fp8_opt = FP8AdamW(twin.parameters(), lr=0.1, exp_avg_dtype="fp32", exp_avg_sq_dtype="fp32")
    fp8_opt.load_state_dict(ref_opt.state_dict())
    back = torch.optim.AdamW(twin.parameters(), lr=0.1, foreach=False)
    back.load_state_dict(to_torch_adam_state_dict(fp8_opt.state_dict()))
    for p, q in zip(ref.parameters(), twin.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ref_opt.state[p][key], back.state[q][key])
    # Default formats quantize the fp32 moments; the dequantized copy is what the next step uses.
    fp8_default = FP8AdamW(twin.parameters(), sqrt_exp_avg_sq=True)
    fp8_default.load_state_dict(ref_opt.state_dict())
    assert fp8_default.state[twin[0].weight]["exp_avg"].dtype == torch.float8_e4m3fn
    portable = to_torch_adam_state_dict(fp8_default.state_dict())
    v_ref = ref_opt.state[ref[0].weight]["exp_avg_sq"]
    torch.testing.assert_close(portable["state"][0]["exp_avg_sq"], v_ref, rtol=2e-3, atol=0)


def test_optimizer_state_bytes_matches_msamp_figure():
    torch.manual_seed(0)
    model = nn.Sequential(FP8Linear(64, 128, wgrad_mode="fp8"), nn.ReLU(), FP8Linear(128, 64, wgrad_mode="fp8"))
    ref = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    opt = FP8AdamW(model.parameters(), model=model)
    ref_opt = torch.optim.AdamW(ref.parameters())
    x = torch.randn(4, 64)
    for m, o in ((model, opt), (ref, ref_opt)):
        m(x).sum().backward()
        o.step()
    weights = fp8_linear_weights(model)
    fp8 = optimizer_state_bytes(opt, weights)
    numel = sum(w.numel() for w in weights)
    assert fp8["numel"] == numel
    assert (fp8["master"], fp8["exp_avg"], fp8["exp_avg_sq"]) == (2 * numel, 1 * numel, 2 * numel)
    assert fp8["scales"] == 2 * 2 * 4 and fp8["step"] == 2 * 4  # two fp32 scales + a step per tensor
    assert 5.0 < fp8["bytes_per_param"] < 5.01
    plain = optimizer_state_bytes(ref_opt, [ref[0].weight, ref[2].weight])
    assert (plain["master"], plain["exp_avg"], plain["exp_avg_sq"]) == (0, 4 * numel, 4 * numel)
    assert 8.0 < plain["bytes_per_param"] < 8.01
    # Biases: no master, E4M3 + FP16 moments (MS-AMP O2 applies the moment formats to every param).
    bias = optimizer_state_bytes(opt, [model[0].bias])
    assert (bias["master"], bias["exp_avg"], bias["exp_avg_sq"]) == (0, 128, 256)
    print(
        f"\nbytes/param of converted weights: FP8AdamW {fp8['bytes_per_param']:.4f}, "
        f"AdamW {plain['bytes_per_param']:.4f}"
    )


def test_fp16_scaled_master_is_counted_at_fp32_size():
    model = _mlp()
    opt = FP8AdamW(model.parameters(), model=model, master_weights="fp16_scaled")
    _train(model, opt, ScalingRegistry(model), 1)
    w = model[0].weight
    report = optimizer_state_bytes(opt, [w])
    assert report["master"] == 4 * w.numel()
    # The fp32 param holds the dequantized FP16 master exactly: re-quantizing it is lossless.
    q, _ = quantize(w.detach(), "fp16")
    assert torch.equal(q.dequantize(), w.detach())


def _tiny_gradient_run(make_opt, steps=20, n=4096, seed=0):
    """Gradients spanning 1e-8..1e-2 (per element, fixed magnitude, 80% sign-consistent)."""
    g0 = torch.Generator().manual_seed(seed)
    magnitude = 10 ** (torch.rand(n, generator=g0) * 6 - 8)
    p = nn.Parameter(torch.randn(n, generator=g0) * 0.1)
    start = p.detach().clone()
    opt = make_opt([p])
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        sign = torch.where(torch.rand(n, generator=g) < 0.8, 1.0, -1.0)
        p.grad = magnitude * sign * (0.5 + torch.rand(n, generator=g))
        opt.step()
    return p.detach() - start, opt, p


def _sqnr_db(ref, approx):
    return 20 * math.log10(ref.norm() / (ref - approx).norm())


def test_sqrt_second_moment_fixes_fp16_underflow():
    ref_update, ref_opt, ref_p = _tiny_gradient_run(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0))
    v_ref = ref_opt.state[ref_p]["exp_avg_sq"]
    results = {}
    for sqrt_v in (False, True):
        update, opt, p = _tiny_gradient_run(
            lambda ps, sqrt_v=sqrt_v: FP8AdamW(
                ps, lr=1e-3, weight_decay=0.0, exp_avg_dtype="fp16", sqrt_exp_avg_sq=sqrt_v
            )
        )
        state = opt.state[p]
        v = dequantize(state["exp_avg_sq"], state["exp_avg_sq_scale_inv"])
        v = v * v if sqrt_v else v
        lost = ((v - v_ref).abs() > 0.01 * v_ref).float().mean().item()  # v off by more than 1%
        results[sqrt_v] = (_sqnr_db(ref_update, update), (update - ref_update).abs().max().item(), lost)
    (plain_db, plain_err, plain_lost), (sqrt_db, sqrt_err, sqrt_lost) = results[False], results[True]
    print(
        f"\ntiny gradients 1e-8..1e-2, update vs AdamW: FP16 v {plain_db:.1f} dB (max err {plain_err:.1e}, "
        f"{100 * plain_lost:.1f}% of v off by >1%); FP16 sqrt(v) {sqrt_db:.1f} dB (max err {sqrt_err:.1e}, "
        f"{100 * sqrt_lost:.1f}%)"
    )
    assert plain_lost > 0.05 and sqrt_lost == 0.0  # plain FP16 v underflows into subnormals/zero
    assert sqrt_db > 60.0 and plain_db < 40.0
    assert sqrt_err * 50 < plain_err
    # With MS-AMP's E4M3 first moment the m quantization dominates: sqrt(v) is no worse there.
    default = [
        _sqnr_db(
            ref_update,
            _tiny_gradient_run(lambda ps, s=s: FP8AdamW(ps, lr=1e-3, weight_decay=0.0, sqrt_exp_avg_sq=s))[0],
        )
        for s in (False, True)
    ]
    assert default[1] >= default[0] - 0.5


def test_small_mlp_training_converges_like_torch_adamw():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 8))
    model = nn.Sequential(FP8Linear(16, 64, wgrad_mode="fp8"), nn.GELU(), FP8Linear(64, 8, wgrad_mode="fp8"))
    model.load_state_dict(ref.state_dict())
    opt = FP8AdamW(model.parameters(), lr=1e-2, weight_decay=1e-3, model=model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=1e-3)
    registry = ScalingRegistry(model)
    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(256, 16, generator=g)
    y_all = torch.tanh(x_all @ torch.randn(16, 8, generator=g) / 4)
    losses, ref_losses = [], []
    for _ in range(80):
        idx = torch.randint(0, 256, (32,), generator=g)
        x, y = x_all[idx], y_all[idx]
        for m, o, log in ((model, opt, losses), (ref, ref_opt, ref_losses)):
            o.zero_grad()
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()
            o.step()
            log.append(loss.item())
        registry.update()
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x_all), y_all).item()
        final_ref = nn.functional.mse_loss(ref(x_all), y_all).item()
    print(f"\nMLP regression: initial {losses[0]:.4f}, final FP8AdamW {final:.5f} vs AdamW {final_ref:.5f}")
    assert all(math.isfinite(v) for v in losses)
    assert final < 0.1 * losses[0]
    assert abs(final - final_ref) <= 0.25 * final_ref + 1e-4
