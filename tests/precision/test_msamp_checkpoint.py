"""Checkpoints of fp8-msamp runs: bit-exact resume (native and portable), the scales in the plugin state, a
portable checkpoint that plain nn.Linear models and torch.optim.AdamW load, and resuming across levels."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from precision_helpers import KeepFP8Layers, TinyMLP, loader, trainer_kwargs

from lightning_plugins import MSAMPPrecision
from lightning_plugins.fp8 import FP8Linear, dequantize
from lightning_plugins.precision import to_portable_checkpoint

EPOCHS = 2  # 8 batches per epoch


def _run(max_epochs, plugin=None, ckpt_path=None, precision=None):
    pl.seed_everything(0, verbose=False)
    model = TinyMLP(step_lr=0.95)
    kwargs = trainer_kwargs(max_epochs=max_epochs, limit_val_batches=0, callbacks=[KeepFP8Layers()])
    if plugin is not None:
        kwargs["plugins"] = [plugin]
    if precision is not None:
        kwargs["precision"] = precision
    trainer = pl.Trainer(**kwargs)
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return model, trainer


def _scales(model):
    return {f"{n}.{r}": (s.scale, s.amax_history, s.counter)
            for n, m in model.named_modules() if isinstance(m, FP8Linear) for r, s in m.scaling_states().items()}


def _assert_same_run(resumed, resumed_trainer, full, full_trainer):
    assert resumed.losses == full.losses[len(full.losses) - len(resumed.losses):]
    for (n, a), (_, b) in zip(resumed.state_dict().items(), full.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), n
    a, b = resumed_trainer.optimizers[0], full_trainer.optimizers[0]
    assert type(a) is type(b)
    for pa, pb in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        for key in a.state[pa]:
            assert torch.equal(a.state[pa][key], b.state[pb][key]), key
    assert a.param_groups[0]["lr"] == b.param_groups[0]["lr"]
    sa, sb = _scales(resumed), _scales(full)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(x, y) for k in sa for x, y in zip(sa[k], sb[k]))


@pytest.fixture(scope="module")
def uninterrupted():
    return _run(2 * EPOCHS, MSAMPPrecision(level="O2"))


@pytest.mark.parametrize("checkpoint_format", ["native", "portable"])
def test_fit_resume_fit_equals_uninterrupted_fit(tmp_path, uninterrupted, checkpoint_format):
    _, first = _run(EPOCHS, MSAMPPrecision(level="O2", checkpoint_format=checkpoint_format))
    path = tmp_path / "half.ckpt"
    first.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # plain tensors only
    assert ckpt["MSAMPPrecision"]["level"] == "O2"
    assert ckpt["MSAMPPrecision"]["fp8_weights"] == ["net.0.weight", "net.2.weight", "net.4.weight"]
    assert set(ckpt["MSAMPPrecision"]["scaling"]["layers"]) == {"net.0", "net.2", "net.4"}
    weight_dtype = torch.float16 if checkpoint_format == "native" else torch.float32
    assert ckpt["state_dict"]["net.0.weight"].dtype == weight_dtype
    resumed, resumed_trainer = _run(2 * EPOCHS, MSAMPPrecision(level="O2"), ckpt_path=path)
    full, full_trainer = uninterrupted
    assert len(resumed.losses) == EPOCHS * 8
    _assert_same_run(resumed, resumed_trainer, full, full_trainer)


def test_checkpoint_loads_into_plain_linear_models(tmp_path):
    model, trainer = _run(1, MSAMPPrecision(level="O2"))
    path = tmp_path / "native.ckpt"
    trainer.save_checkpoint(path)
    native = torch.load(path, weights_only=True)
    portable = to_portable_checkpoint(native)
    torch.save(portable, tmp_path / "portable.ckpt")
    portable = torch.load(tmp_path / "portable.ckpt", weights_only=True)
    x = torch.randn(4, 32)
    for ckpt in (native, portable):
        plain = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)
        )
        plain.load_state_dict({k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()}, strict=True)
        # exactly the FP8 model's master weights (fp16 values, upcast exactly)
        for (_, p), m in zip(plain.named_parameters(), model.net.parameters()):
            assert torch.equal(p, m.float())
        assert torch.isfinite(plain(x)).all()
    # portable: fp32 weights, torch.optim.AdamW states, and a stock AdamW loads them
    assert portable["state_dict"]["net.0.weight"].dtype == torch.float32
    assert portable["MSAMPPrecision"]["checkpoint_format"] == "portable"
    opt_state = portable["optimizer_states"][0]
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in opt_state["state"].values())
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt_state["state"].values())
    plain_model = TinyMLP()
    adamw = torch.optim.AdamW(plain_model.parameters(), lr=1e-2)
    adamw.load_state_dict(opt_state)
    fp8_state = native["optimizer_states"][0]["state"][0]
    assert torch.equal(adamw.state[plain_model.net[0].weight]["exp_avg"],
                       dequantize(fp8_state["exp_avg"], fp8_state["exp_avg_scale_inv"]))


def test_portable_checkpoint_resumes_in_a_plain_32_true_run(tmp_path):
    _, trainer = _run(1, MSAMPPrecision(level="O2", checkpoint_format="portable"))
    path = tmp_path / "portable.ckpt"
    trainer.save_checkpoint(path)
    model, plain_trainer = _run(2, precision="32-true", ckpt_path=path)
    assert type(plain_trainer.optimizers[0]) is torch.optim.AdamW
    assert len(model.losses) == 8 and all(torch.isfinite(torch.tensor(model.losses)))


def test_O2_checkpoint_resumes_at_O1_with_dequantized_moments(tmp_path):
    _, trainer = _run(1, MSAMPPrecision(level="O2"))
    path = tmp_path / "o2.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["optimizer_states"][0]["state"][0]
    model, o1_trainer = _run(1, MSAMPPrecision(level="O1"), ckpt_path=path)  # max_epochs reached: restore only
    opt = o1_trainer.optimizers[0]
    assert type(opt) is torch.optim.AdamW
    loaded = opt.state[model.net[0].weight]
    assert loaded["exp_avg"].dtype == torch.float32
    assert torch.equal(loaded["exp_avg"], dequantize(saved["exp_avg"], saved["exp_avg_scale_inv"]))


def test_plugin_state_dict_round_trip():
    model, trainer = _run(1, MSAMPPrecision(level="O1"))
    plugin = trainer.precision_plugin
    state = plugin.state_dict()
    assert state["format_version"] == 1 and state["skipped_steps"] == 0
    fresh = MSAMPPrecision(level="O1")
    fresh.load_state_dict(state)  # before conversion: kept and applied when the model is converted
    other = TinyMLP()
    fresh.convert_module(other)
    assert all(torch.equal(a, b) for k in _scales(model) for a, b in zip(_scales(model)[k], _scales(other)[k]))
    with pytest.raises(ValueError, match="format_version"):
        fresh.load_state_dict({"format_version": 99, "scaling": {}})
