"""MSAMPFabricPrecision: a Fabric loop with the explicit O2 optimizer swap matches the Trainer plugin exactly."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from precision_helpers import TinyMLP, fit, loader

from lightning_plugins import MSAMPFabricPrecision, MSAMPPrecision
from lightning_plugins.fp8 import FP8AdamW


def _fabric_run(steps, bad_step=None):
    pl.seed_everything(0, verbose=False)
    plugin = MSAMPFabricPrecision(level="O2")
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    model = plugin.convert_module(TinyMLP())
    optimizer = plugin.convert_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2), model)
    model, optimizer = fabric.setup(model, optimizer)
    losses = []
    for i, (x, y) in zip(range(steps), loader()):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        losses.append(loss.item())
        fabric.backward(loss * float("inf") if i == bad_step else loss)
        optimizer.step()
    return plugin, optimizer, losses


def test_fabric_loop_equals_trainer_run():
    plugin, optimizer, losses = _fabric_run(8)
    assert isinstance(optimizer.optimizer, FP8AdamW)
    trained, _ = fit(plugins=[MSAMPPrecision(level="O2")], steps=8)
    assert losses == trained.losses
    assert plugin.state_dict()["scaling"]["layers"].keys() == {"net.0", "net.2", "net.4"}


def test_fabric_skips_a_non_finite_step():
    plugin, optimizer, losses = _fabric_run(6, bad_step=2)
    assert plugin.skipped_steps == 1
    assert {int(s["step"]) for s in optimizer.optimizer.state.values()} == {5}
    assert all(torch.isfinite(torch.tensor(losses)))


def test_conversion_before_setup_is_logged_once(monkeypatch):
    messages = []
    monkeypatch.setattr("lightning_plugins.precision.fabric.rank_zero_info", messages.append)
    plugin = MSAMPFabricPrecision(level="O1")
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    model = plugin.convert_module(TinyMLP())
    fabric.setup(model, torch.optim.AdamW(model.parameters()))
    assert len([m for m in messages if m.startswith("MSAMPFabricPrecision(level=O1)")]) == 1
    assert plugin.conversion_report is not None


def _string_fabric_step(clip=None):
    """One O2 step of a Fabric built from the string, with AdamW (swapped by fabric.setup)."""
    pl.seed_everything(0, verbose=False)
    fabric = Fabric(accelerator="cpu", devices=1, precision="fp8-msamp")
    model = TinyMLP()
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2))
    x, y = next(iter(loader()))
    fabric.backward(F.cross_entropy(model(x), y))
    return fabric, model, optimizer


def test_fabric_precision_string_is_the_o2_plugin_and_swaps_adamw():
    """Before: Fabric(precision="fp8-msamp") raised Lightning's generic 'invalid precision' error."""
    fabric, _, optimizer = _string_fabric_step()
    assert isinstance(fabric._precision, MSAMPFabricPrecision) and fabric._precision.level == "O2"
    assert isinstance(optimizer.optimizer, FP8AdamW)


def test_fabric_string_loop_equals_the_explicit_plugin_loop():
    plugin, _, explicit = _fabric_run(6)
    pl.seed_everything(0, verbose=False)
    fabric = Fabric(accelerator="cpu", devices=1, precision="fp8-msamp")
    model = TinyMLP()
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2))
    losses = []
    for _, (x, y) in zip(range(6), loader()):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        losses.append(loss.item())
        fabric.backward(loss)
        optimizer.step()
    assert losses == explicit


def test_fabric_clip_gradients_includes_the_fp8_weight_gradients():
    """Before: at O2 fabric.clip_gradients saw only .grad (the biases): 0.160 instead of 0.391 on a model."""
    from lightning_plugins.fp8 import get_fp8_grad

    fabric, model, optimizer = _string_fabric_step()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    parts = [get_fp8_grad(p).dequantize(torch.float32) if get_fp8_grad(p) is not None else p.grad for p in params]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in parts]))
    assert sum(get_fp8_grad(p) is not None for p in params) == 3
    norm = fabric.clip_gradients(model, optimizer, max_norm=1e-3)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    # clipped: the total norm is max_norm now (FP8 gradients scaled through their scale)
    after = [get_fp8_grad(p).dequantize(torch.float32) if get_fp8_grad(p) is not None else p.grad for p in params]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in after]))
    torch.testing.assert_close(total, torch.tensor(1e-3), rtol=1e-4, atol=0)


def test_fabric_o2_optimizers_need_the_model_first():
    fabric = Fabric(accelerator="cpu", devices=1, precision="fp8-msamp")
    model = TinyMLP()
    with pytest.raises(RuntimeError, match="set up the model first"):
        fabric.setup_optimizers(torch.optim.AdamW(model.parameters()))
