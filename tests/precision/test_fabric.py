"""MSAMPFabricPrecision: a Fabric loop with the explicit O2 optimizer swap matches the Trainer plugin exactly."""

from __future__ import annotations

import lightning.pytorch as pl
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
