"""FP8 runs compose with what a user does next: a later fit in another precision trains every weight, the model
goes back to plain layers after each FP8 run (and comes back to FP8 with its scales at the next), Hugging Face
GPT-2's Conv1D layers convert exactly, and the FP8 state reaches the logger."""

from __future__ import annotations

import copy
import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from precision_helpers import TinyMLP, loader, trainer_kwargs
from torch import nn

from lightning_plugins import MSAMPPrecision
from lightning_plugins.fp8 import (
    FP8Conv1D,
    FP8Linear,
    ScalingState,
    convert_to_fp8,
    count_saturation,
    get_fp8_grad,
    quantize_with_state,
)


def _fit(model, steps, **kwargs):
    trainer = pl.Trainer(**trainer_kwargs(max_steps=steps, limit_val_batches=0, **kwargs))
    trainer.fit(model, loader())
    return trainer


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_every_weight_trains_in_a_32_true_fit_after_an_fp8_fit(level):
    """Before: after an O2 fit the FP8Linear layers stayed in the model with FP16 weights and FP8 weight
    gradients, so a 32-true fit trained only the biases."""
    pl.seed_everything(0, verbose=False)
    model = TinyMLP()
    _fit(model, 3, plugins=[MSAMPPrecision(level=level)])
    assert not [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert all(type(m) is nn.Linear for m in model.net if m.__class__.__name__.endswith("Linear"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _fit(model, 3, precision="32-true")
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged, f"parameters that did not train: {unchanged}"


def test_restored_model_equals_the_fp8_weights_and_loads_into_a_plain_model():
    pl.seed_everything(0, verbose=False)
    model = TinyMLP()
    captured = {}

    class Capture(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            captured.update({n: p.detach().float().clone() for n, p in pl_module.named_parameters()})

    _fit(model, 4, precision="fp8-msamp", callbacks=[Capture()])
    assert captured and all(torch.equal(p, captured[n]) for n, p in model.named_parameters())
    plain = TinyMLP()
    plain.load_state_dict(model.state_dict())


def test_a_second_fp8_fit_converts_again_and_continues_the_scales():
    pl.seed_everything(0, verbose=False)
    model = TinyMLP()
    plugin = MSAMPPrecision(level="O1")
    trainer = _fit(model, 3, plugins=[plugin])
    carried = plugin.state_dict()["scaling"]["layers"]["net.0"]["input"]
    assert int(carried["counter"]) == 3
    counters = []

    class Counter(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            counters.append(int(pl_module.net[0].input_scaling.counter))

    trainer.fit_loop.epoch_loop.max_steps = 5
    trainer.callbacks.append(Counter())
    trainer.fit(model, loader())
    assert counters == [3]  # the same model, converted again, starts from the scales it had
    assert type(model.net[0]) is nn.Linear


def test_keep_fp8_layers_when_asked():
    model = TinyMLP()
    _fit(model, 1, plugins=[MSAMPPrecision(restore_layers=False)])
    assert sum(isinstance(m, FP8Linear) for m in model.modules()) == 3


def test_restore_undoes_the_ddp_ignore_list():
    model = TinyMLP()
    model._ddp_params_and_buffers_to_ignore = ["user.param"]
    plugin = MSAMPPrecision(level="O2")
    plugin.convert_module(model)
    assert len(model._ddp_params_and_buffers_to_ignore) == 4
    assert plugin.restore_module() == 3
    assert model._ddp_params_and_buffers_to_ignore == ["user.param"]
    assert plugin.restore_module() == 0


# --- transformers Conv1D (GPT-2) -------------------------------------------------------------------------------


def _conv1d(nf, nx, seed=0):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    conv = Conv1D(nf, nx)
    with torch.no_grad():
        conv.bias.normal_()
    return conv


@pytest.mark.parametrize("wgrad_mode", ["dequantized", "fp8"])
def test_fp8_conv1d_equals_fp8_linear_on_the_transposed_weight(wgrad_mode):
    """The reference: an FP8Linear holding W^T computes exactly what FP8Conv1D computes on W."""
    conv = _conv1d(48, 32)
    linear = nn.Linear(32, 48)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    a = FP8Conv1D.from_conv1d(conv, backend="emulated", wgrad_mode=wgrad_mode)
    b = FP8Linear.from_linear(linear, backend="emulated", wgrad_mode=wgrad_mode)
    x = torch.randn(3, 5, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    assert torch.equal(ya, yb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert torch.equal(xa.grad, xb.grad) and torch.equal(a.bias.grad, b.bias.grad)
    if wgrad_mode == "fp8":
        ga, gb = get_fp8_grad(a.weight), get_fp8_grad(b.weight)
        assert a.weight.grad is None
        assert torch.equal(ga.dequantize(torch.float32), gb.dequantize(torch.float32).t())
    else:
        assert a.weight.grad.shape == (32, 48)
        assert torch.equal(a.weight.grad, b.weight.grad.t())


def test_fp8_conv1d_is_close_to_conv1d_and_converts_back():
    conv = _conv1d(64, 32)
    reference = copy.deepcopy(conv)
    model = nn.Sequential(conv)
    report = convert_to_fp8(model, backend="emulated")
    assert isinstance(model[0], FP8Conv1D) and model[0].nf == 64 and model[0].nx == 32
    assert [(d.layer_type, d.status) for d in report.decisions] == [("Conv1D", "converted")]
    x = torch.randn(8, 32)
    exact = reference(x)
    assert (model(x) - exact).abs().max() < 0.1 * exact.abs().max()  # E4M3 operands: ~2^-4 relative
    assert set(model.state_dict()) == {"0.weight", "0.bias"}
    nn.Sequential(reference).load_state_dict(model.state_dict())
    from lightning_plugins.fp8 import revert_fp8

    assert revert_fp8(model) == 1 and type(model[0]).__name__ == "Conv1D" and model[0].weight.shape == (32, 64)


def test_gpt2_trains_in_fp8_through_the_trainer():
    """Before: GPT-2's projections are Conv1D, so conversion found nothing and suggested relaxing the filters."""
    from transformers import GPT2Config, GPT2LMHeadModel

    class GPT2Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
            self.model = GPT2LMHeadModel(config)
            self.losses = []

        def training_step(self, batch, batch_idx):
            loss = self.model(input_ids=batch, labels=batch).loss
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    torch.manual_seed(0)
    pattern = torch.arange(16).repeat(2)
    data = torch.utils.data.DataLoader([pattern.roll(int(s)) for s in torch.randint(0, 16, (64,))], batch_size=8)
    module = GPT2Module()
    plugin = MSAMPPrecision(level="O2", restore_layers=False)
    trainer = pl.Trainer(**trainer_kwargs(max_steps=16, limit_val_batches=0), plugins=[plugin])
    trainer.fit(module, data)
    report = plugin.conversion_report
    converted = {d.name for d in report.converted}
    assert {"model.transformer.h.0.attn.c_attn", "model.transformer.h.1.mlp.c_proj"} <= converted
    assert len(converted) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert all(isinstance(module.get_submodule(n), FP8Conv1D) for n in converted)
    table = report.table()
    assert "transformers.pytorch_utils.Conv1D" in table and "lm_head" in table and "Embedding" in table
    assert module.losses[-1] < 0.7 * module.losses[0]


# --- what reaches the logger -----------------------------------------------------------------------------------


def test_saturation_counter_counts_clipped_values():
    state = ScalingState("e4m3", history_len=4)
    x = torch.tensor([1.0, -2.0, 3.0, 500.0, -1000.0, float("inf")])
    with count_saturation() as counter:
        # warm-up scale from the amax (inf is not a valid amax: the scale stays 1): 500, 1000, inf exceed 448
        quantize_with_state(x, state, record=True)
        quantize_with_state(torch.ones(4), state, record=False)  # evaluation casts are not counted
    assert int(counter.clipped[state]) == 3 and counter.elements[state] == 6
    quantize_with_state(x, state)  # outside the block nothing is counted
    assert counter.elements[state] == 6


def test_fp8_metrics_and_the_conversion_report_reach_the_logger(tmp_path):
    pl.seed_everything(0, verbose=False)
    logger = CSVLogger(tmp_path, name="run")
    _fit(TinyMLP(), 6, plugins=[MSAMPPrecision(log_fp8_stats="per_layer")], logger=logger, log_every_n_steps=2)
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("fp8/input/amax")]
    assert [int(r["step"]) for r in logged] == [1, 3, 5]  # the logger's cadence, no other step
    for key in ("fp8/skipped_steps", "fp8/grad_output/scale_log2_max", "fp8/clipped_share",
                "fp8/layers/net.0/weight/amax"):
        assert all(r[key] != "" for r in logged), key
    assert all(0.0 <= float(r["fp8/clipped_share"]) <= 1.0 for r in logged)
    with open(logger.log_dir + "/fp8_conversion.csv") as f:
        report = list(csv.DictReader(f))
    assert [r["layer"] for r in report if r["status"] == "converted"] == ["net.0", "net.2", "net.4"]
    with open(logger.log_dir + "/hparams.yaml") as f:
        assert "fp8/converted_layers: 3.0" in f.read()


def test_no_lm_head_notice_for_models_without_one():
    report = convert_to_fp8(TinyMLP(), log_table=False)
    assert "lm_head" not in report.table()
