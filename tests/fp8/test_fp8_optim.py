"""FP8Adam/FP8AdamW vs torch.optim.Adam/AdamW (the independent reference), options, errors, from_optimizer."""

import itertools
import types
import warnings

import pytest
import torch
from torch import nn

from lightning_plugins.fp8 import (
    EXP_AVG_DTYPES,
    EXP_AVG_SQ_DTYPES,
    MASTER_WEIGHTS,
    FP8Adam,
    FP8AdamW,
    FP8Linear,
    from_optimizer,
    get_fp8_grad,
    quantize,
    rebind_lr_schedulers,
    set_fp8_grad,
)

ANCHOR_ATOL = 3e-4  # MS-AMP tests/optim/test_adamw.py: 4 steps, weight decay 1e-3, Linear(4, 4)
COMBOS = list(itertools.product(EXP_AVG_DTYPES, EXP_AVG_SQ_DTYPES, MASTER_WEIGHTS, (False, True)))


def _twins(seed=0, in_f=4, out_f=4):
    """A reference nn.Linear and an FP8 model holding the same initial weights (fp32 copies)."""
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f)
    lin = nn.Linear(in_f, out_f)
    lin.load_state_dict(ref.state_dict())
    return ref, nn.Sequential(FP8Linear.from_linear(lin))


def _random_grads(shapes, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def _msamp_grads(ref, steps=4, seed=1):
    """MS-AMP's anchor: ``linear(x).sum().backward()`` with a fixed input, every step (a constant gradient)."""
    x = torch.randn(4, ref.in_features, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(ref(x).sum(), list(ref.parameters()))
    return [list(grads)] * steps


def _run_pair(ref, model, opt, ref_opt, grads, fp8_side_channel=False):
    """Feed both optimizers the same gradients; returns the FP8 and reference params (fp32)."""
    for step_grads in grads:
        for p, q, g in zip(model.parameters(), ref.parameters(), step_grads):
            if fp8_side_channel and p.dim() == 2:
                q8, _ = quantize(g, "e4m3")
                set_fp8_grad(p, q8)
                q.grad = q8.dequantize()  # the reference sees exactly the same gradient values
            else:
                p.grad = g.to(p.dtype)
                q.grad = g.to(p.dtype).float()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    return [p.detach().float() for p in model.parameters()], [q.detach() for q in ref.parameters()]


def _max_diff(pair):
    return max((a - b).abs().max().item() for a, b in zip(*pair))


def _fp16_half_ulp(x):
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0**-14)))
    return torch.exp2(exponent - 11)


def _build(cls, model, exp_avg="e4m3", exp_avg_sq="fp16", master="fp16", sqrt_v=False, **kw):
    return cls(
        model.parameters(),
        lr=1e-3,
        weight_decay=1e-3,
        model=model,
        exp_avg_dtype=exp_avg,
        exp_avg_sq_dtype=exp_avg_sq,
        master_weights=master,
        sqrt_exp_avg_sq=sqrt_v,
        **kw,
    )


@pytest.mark.parametrize(("exp_avg", "exp_avg_sq", "master", "sqrt_v"), COMBOS)
def test_fp8_adamw_matches_torch_adamw_anchor(exp_avg, exp_avg_sq, master, sqrt_v):
    ref, model = _twins()
    opt = _build(FP8AdamW, model, exp_avg, exp_avg_sq, master, sqrt_v)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=1e-3)
    diff = _max_diff(_run_pair(ref, model, opt, ref_opt, _msamp_grads(ref)))
    print(f"\nFP8AdamW vs AdamW exp_avg={exp_avg} exp_avg_sq={exp_avg_sq} master={master} sqrt_v={sqrt_v}: {diff:.2e}")
    assert diff <= ANCHOR_ATOL
    state = opt.state[model[0].weight]
    assert (
        state["exp_avg"].dtype == {"e4m3": torch.float8_e4m3fn, "fp16": torch.float16, "fp32": torch.float32}[exp_avg]
    )
    assert state["exp_avg_sq"].dtype == {"fp16": torch.float16, "fp32": torch.float32}[exp_avg_sq]
    assert model[0].weight.dtype == (torch.float16 if master == "fp16" else torch.float32)
    assert model[0].bias.dtype == torch.float32  # only FP8Linear weights get a master


@pytest.mark.parametrize(("exp_avg", "exp_avg_sq", "master", "sqrt_v"), COMBOS)
def test_fp8_adamw_random_gradients_within_rounding_bound(exp_avg, exp_avg_sq, master, sqrt_v):
    # Changing gradients: 3e-4 for the moments, plus half an FP16 ulp per master rounding
    # (the initial cast and 4 steps), which the constant-gradient anchor above does not exercise.
    ref, model = _twins(seed=11)
    opt = _build(FP8AdamW, model, exp_avg, exp_avg_sq, master, sqrt_v)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=1e-3)
    fp8_params, ref_params = _run_pair(ref, model, opt, ref_opt, _random_grads([p.shape for p in ref.parameters()], 4))
    for name, a, b in zip(("weight", "bias"), fp8_params, ref_params):
        roundings = 5 if (master != "fp32" and name == "weight") else 0
        bound = ANCHOR_ATOL + roundings * _fp16_half_ulp(b)
        assert ((a - b).abs() <= bound).all(), (name, (a - b).abs().max().item())


@pytest.mark.parametrize("master", MASTER_WEIGHTS)
@pytest.mark.parametrize("decoupled", [False, True])
def test_fp8_adam_matches_torch_adam(master, decoupled):
    ref, model = _twins(seed=2)
    opt = _build(FP8Adam, model, master=master, decoupled_weight_decay=decoupled)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3, weight_decay=1e-3, decoupled_weight_decay=decoupled)
    assert _max_diff(_run_pair(ref, model, opt, ref_opt, _msamp_grads(ref))) <= ANCHOR_ATOL


@pytest.mark.parametrize("master", MASTER_WEIGHTS)
def test_fp8_side_channel_gradient_source(master):
    ref, model = _twins(seed=3)
    opt = _build(FP8AdamW, model, master=master)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=1e-3)
    assert _max_diff(_run_pair(ref, model, opt, ref_opt, _msamp_grads(ref), fp8_side_channel=True)) <= ANCHOR_ATOL
    assert model[0].weight.grad is None


def test_fp32_states_without_master_are_bit_identical_to_torch():
    ref, model = _twins(seed=4, in_f=32, out_f=16)
    opt = FP8AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2, exp_avg_dtype="fp32", exp_avg_sq_dtype="fp32")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=1e-2, foreach=False)
    grads = _random_grads([p.shape for p in ref.parameters()], 6)
    assert _max_diff(_run_pair(ref, model, opt, ref_opt, grads)) == 0.0


def test_both_gradient_sources_are_summed():
    _, model = _twins(seed=5)
    w = model[0].weight
    opt = FP8AdamW([w], lr=1e-3, exp_avg_dtype="fp32", exp_avg_sq_dtype="fp32")
    ref = nn.Parameter(w.detach().clone())
    ref_opt = torch.optim.AdamW([ref], lr=1e-3)
    g1, g2 = torch.randn(4, 4), torch.randn(4, 4)
    q, _ = quantize(g2, "e4m3")
    w.grad, ref.grad = g1.clone(), g1 + q.dequantize()
    set_fp8_grad(w, q)
    opt.step()
    ref_opt.step()
    torch.testing.assert_close(w.detach(), ref.detach(), rtol=0, atol=1e-7)


def test_param_groups_with_different_lr_and_weight_decay():
    ref, model = _twins(seed=6, in_f=16, out_f=16)
    layer, ref_layer = model[0], ref
    opt = FP8AdamW(
        [
            {"params": [layer.weight], "lr": 2e-3, "weight_decay": 1e-2},
            {
                "params": [layer.bias],
                "lr": 5e-4,
                "weight_decay": 0.0,
                "exp_avg_dtype": "fp32",
                "exp_avg_sq_dtype": "fp32",
            },
        ],
        lr=1e-3,
        model=model,
    )
    ref_opt = torch.optim.AdamW(
        [
            {"params": [ref_layer.weight], "lr": 2e-3, "weight_decay": 1e-2},
            {"params": [ref_layer.bias], "lr": 5e-4, "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    assert _max_diff(_run_pair(ref, model, opt, ref_opt, _msamp_grads(ref))) <= ANCHOR_ATOL
    assert opt.state[layer.bias]["exp_avg"].dtype == torch.float32
    assert opt.state[layer.weight]["exp_avg"].dtype == torch.float8_e4m3fn
    assert [g["lr"] for g in opt.param_groups] == [2e-3, 5e-4]


def test_non_master_low_precision_param_is_updated_in_its_dtype():
    # MS-AMP computed on param.float() of a bf16 param and dropped the result.
    p = nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = FP8AdamW([p], lr=0.1, weight_decay=0.0)
    p.grad = torch.ones(8, dtype=torch.bfloat16)
    opt.step()
    assert p.dtype == torch.bfloat16
    assert torch.allclose(p.float(), torch.full((8,), 0.9), atol=1e-2)


def test_maximize_and_no_bias_correction():
    ref, model = _twins(seed=7)
    opt = FP8AdamW(model.parameters(), lr=1e-3, maximize=True, model=model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, maximize=True)
    assert _max_diff(_run_pair(ref, model, opt, ref_opt, _msamp_grads(ref))) <= ANCHOR_ATOL
    p = nn.Parameter(torch.zeros(4))
    opt = FP8AdamW([p], lr=1.0, weight_decay=0.0, bias_correction=False, exp_avg_dtype="fp32", exp_avg_sq_dtype="fp32")
    p.grad = torch.ones(4)
    opt.step()
    # m = 0.1, v = 0.001 without correction: update = 0.1 / sqrt(0.001)
    torch.testing.assert_close(p.detach(), torch.full((4,), -0.1 / 0.001**0.5), rtol=1e-5, atol=0)


def test_zero_grad_clears_fp8_side_channel():
    _, model = _twins()
    opt = FP8AdamW(model.parameters(), model=model)
    model(torch.randn(2, 4)).sum().backward()
    model[0].wgrad_mode = "fp8"
    model(torch.randn(2, 4)).sum().backward()
    assert get_fp8_grad(model[0].weight) is not None
    opt.zero_grad()
    assert get_fp8_grad(model[0].weight) is None and model[0].weight.grad is None


# ---------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    ("option", "value"),
    [("amsgrad", True), ("fused", True), ("foreach", True), ("capturable", True), ("differentiable", True)],
)
def test_unsupported_options_are_refused(option, value):
    p = nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match=rf"{option}=True.*{option}="):
        FP8AdamW([p], **{option: value})
    with pytest.raises(ValueError, match=rf"{option}=True \(param group 0\)"):
        FP8AdamW([{"params": [p], option: value}])
    torch_opt = torch.optim.AdamW([p], **{option: value})
    with pytest.raises(ValueError, match=rf"{option}=True \(AdamW param group 0\).*{option}="):
        from_optimizer(torch_opt)


def test_unsupported_options_refused_from_optimizer_groups():
    p = nn.Parameter(torch.zeros(4))
    torch_opt = torch.optim.Adam([p])
    torch_opt.param_groups[0]["fused"] = True  # as a GPU run would have it
    with pytest.raises(ValueError, match=r"fused=True.*fused=None"):
        from_optimizer(torch_opt)


def test_non_adam_optimizer_is_a_type_error():
    p = nn.Parameter(torch.zeros(4))
    with pytest.raises(TypeError, match=r"torch\.optim\.Adam and torch\.optim\.AdamW.*got torch\.optim\.sgd\.SGD"):
        from_optimizer(torch.optim.SGD([p], lr=0.1))

    class MyAdamW(torch.optim.AdamW):
        pass

    with pytest.raises(TypeError, match="MyAdamW"):
        FP8AdamW.from_optimizer(MyAdamW([p]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"exp_avg_dtype": "e5m2"}, r"exp_avg_dtype='e5m2'.*\['e4m3', 'fp16', 'fp32'\]"),
        ({"exp_avg_sq_dtype": "e4m3"}, r"exp_avg_sq_dtype='e4m3'.*\['fp16', 'fp32'\]"),
        ({"master_weights": "bf16", "model": "M"}, r"master_weights='bf16'.*\['fp16', 'fp16_scaled', 'fp32'\]"),
        ({"master_weights": "fp16"}, r"master_weights='fp16' needs.*model="),
        ({"lr": -1.0}, r"lr=-1.0"),
        ({"betas": (0.9, 1.0)}, r"betas\[1\]=1.0"),
        ({"weight_decay": -0.1}, r"weight_decay=-0.1"),
    ],
)
def test_bad_values_are_value_errors(kwargs, match):
    _, model = _twins()
    if kwargs.get("model") == "M":
        kwargs["model"] = model
    with pytest.raises(ValueError, match=match):
        FP8AdamW(model.parameters(), **kwargs)


def test_model_without_fp8_weights_and_bf16_scaled_master_are_refused():
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no FP8Linear weight.*convert_to_fp8"):
        FP8AdamW(plain.parameters(), model=plain)
    _, model = _twins()
    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="fp16_scaled.*bfloat16.*master_weights='fp16'"):
        FP8AdamW(model.parameters(), model=model, master_weights="fp16_scaled")


def test_dtype_options_accept_torch_dtypes():
    _, model = _twins()
    opt = FP8AdamW(model.parameters(), exp_avg_dtype=torch.float8_e4m3fn, exp_avg_sq_dtype=torch.float32)
    assert (opt.defaults["exp_avg_dtype"], opt.defaults["exp_avg_sq_dtype"]) == ("e4m3", "fp32")


# ---------------------------------------------------------------------------- from_optimizer + schedulers


def test_from_optimizer_keeps_groups_and_hyperparameters():
    _, model = _twins(in_f=16, out_f=16)
    layer = model[0]
    torch_opt = torch.optim.AdamW(
        [{"params": [layer.weight], "name": "decay"}, {"params": [layer.bias], "weight_decay": 0.0, "lr": 3e-4}],
        lr=2e-3,
        betas=(0.8, 0.95),
        eps=1e-6,
        weight_decay=0.05,
        maximize=False,
    )
    old_groups = list(torch_opt.param_groups)
    opt = from_optimizer(torch_opt, model=model)
    assert type(opt) is FP8AdamW
    assert all(a is b for a, b in zip(opt.param_groups, old_groups))  # the same dicts
    g0, g1 = opt.param_groups
    assert (g0["lr"], g0["betas"], g0["eps"], g0["weight_decay"], g0["name"]) == (
        2e-3,
        (0.8, 0.95),
        1e-6,
        0.05,
        "decay",
    )
    assert (g1["lr"], g1["weight_decay"]) == (3e-4, 0.0)
    assert (opt.defaults["lr"], opt.defaults["betas"], opt.defaults["eps"]) == (2e-3, (0.8, 0.95), 1e-6)
    assert g0["exp_avg_dtype"] == "e4m3" and g0["master_weights"] == "fp16"
    assert opt.is_master(layer.weight) and not opt.is_master(layer.bias)
    assert from_optimizer(opt) is opt  # idempotent


def test_from_optimizer_picks_adam_or_adamw():
    p = nn.Parameter(torch.zeros(4))
    assert type(from_optimizer(torch.optim.Adam([p], weight_decay=0.1))) is FP8Adam
    assert type(from_optimizer(torch.optim.Adam([p], weight_decay=0.1, decoupled_weight_decay=True))) is FP8AdamW
    assert type(FP8AdamW.from_optimizer(torch.optim.Adam([p]))) is FP8AdamW  # no decay: equivalent
    assert type(FP8Adam.from_optimizer(torch.optim.AdamW([p], weight_decay=0.1))) is FP8Adam
    assert FP8Adam.from_optimizer(torch.optim.AdamW([p], weight_decay=0.1)).param_groups[0]["decoupled_weight_decay"]
    with pytest.raises(ValueError, match="L2 weight decay.*FP8Adam.from_optimizer"):
        FP8AdamW.from_optimizer(torch.optim.Adam([p], weight_decay=0.1))


def test_from_optimizer_converts_existing_state_exactly_with_fp32_formats():
    ref, model = _twins(seed=8, in_f=16, out_f=16)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    twin_opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    grads = _random_grads([p.shape for p in ref.parameters()], 5)
    for i, step in enumerate(grads):
        if i == 3:
            twin_opt = from_optimizer(twin_opt, exp_avg_dtype="fp32", exp_avg_sq_dtype="fp32")
        for p, q, g in zip(model.parameters(), ref.parameters(), step):
            p.grad, q.grad = g.clone(), g.clone()
        twin_opt.step()
        ref_opt.step()
    assert isinstance(twin_opt, FP8AdamW)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_rebind_lr_schedulers_keeps_the_schedule():
    _, model = _twins()
    torch_opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    step_lr = torch.optim.lr_scheduler.StepLR(torch_opt, step_size=1, gamma=0.5)
    other = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), step_size=1)
    config = types.SimpleNamespace(scheduler=step_lr)  # like Lightning's LRSchedulerConfig
    opt = from_optimizer(torch_opt, model=model)
    assert rebind_lr_schedulers([config, other], torch_opt, opt) == 1
    assert step_lr.optimizer is opt and other.optimizer is not opt
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            step_lr.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 / 8)
    assert step_lr.get_last_lr() == [pytest.approx(0.01 / 8)]


def test_rebind_follows_sequential_lr():
    p = nn.Parameter(torch.zeros(4))
    torch_opt = torch.optim.AdamW([p], lr=0.1)
    warm = torch.optim.lr_scheduler.LinearLR(torch_opt, start_factor=0.5, total_iters=2)
    decay = torch.optim.lr_scheduler.ExponentialLR(torch_opt, gamma=0.5)
    seq = torch.optim.lr_scheduler.SequentialLR(torch_opt, [warm, decay], milestones=[2])
    opt = from_optimizer(torch_opt)
    assert rebind_lr_schedulers([seq], torch_opt, opt) == 3
    for _ in range(4):
        p.grad = torch.ones(4)
        opt.step()
        seq.step()
    assert all(s.optimizer is opt for s in (seq, warm, decay))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
