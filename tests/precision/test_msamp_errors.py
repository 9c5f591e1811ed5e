"""Every bad input to the FP8 precision plugin gives an error that names the value, the allowed ones and a fix."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from precision_helpers import TinyMLP, fit, loader, trainer_kwargs
from torch import nn

from lightning_plugins import MSAMPFabricPrecision, MSAMPPrecision
from lightning_plugins.fp8 import convert_to_fp8


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"level": "O4"}, ValueError, r"Unknown MS-AMP level 'O4'; allowed: \['O1', 'O2', 'O3'\]"),
        ({"level": 2}, ValueError, "Unknown MS-AMP level 2"),
        ({"backend": "cuda"}, ValueError, r"Unknown FP8 GEMM backend 'cuda'; allowed: \['auto', 'torch'"),
        ({"compute_dtype": torch.float16}, ValueError, "use 'bfloat16'"),
        ({"compute_dtype": "int8"}, ValueError, "Unsupported compute_dtype 'int8'"),
        ({"grad_comm": "fp4"}, ValueError, r"Unknown grad_comm 'fp4'; allowed: \['fp8', 'hp'\]"),
        ({"exp_avg_dtype": "e5m2"}, ValueError, r"Unknown exp_avg_dtype 'e5m2'"),
        ({"master_weights": "bf16"}, ValueError, r"Unknown master_weights 'bf16'"),
        ({"checkpoint_format": "zip"}, ValueError, r"Unknown checkpoint_format 'zip'"),
        ({"amax_history_len": 0}, ValueError, "amax_history_len must be an int >= 1"),
        ({"margin": -1}, ValueError, "margin must be an int >= 0"),
        ({"exclude": [3]}, TypeError, "exclude must be a list"),
        ({"module_filter_fn": "lm_head"}, TypeError, "module_filter_fn must be a callable"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    for cls in (MSAMPPrecision, MSAMPFabricPrecision):
        with pytest.raises(error, match=match):
            cls(**kwargs)


def test_level_is_case_insensitive_and_compute_dtype_names():
    plugin = MSAMPPrecision(level="o1", compute_dtype="bf16")
    assert plugin.level == "O1" and plugin.compute_dtype == torch.bfloat16
    assert MSAMPPrecision(compute_dtype=torch.float32).compute_dtype == torch.float32


def test_non_adam_optimizer_at_O2():
    with pytest.raises(TypeError, match=r"needs torch.optim.Adam or torch.optim.AdamW, got torch.optim.sgd.SGD.*level='O1'"):
        fit(precision="fp8-msamp", steps=1, model=TinyMLP(optimizer="sgd"))


def test_unsupported_adam_option_at_O2():
    class AmsGrad(TinyMLP):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), amsgrad=True)

    with pytest.raises(ValueError, match="amsgrad=True.*amsgrad=False"):
        fit(precision="fp8-msamp", steps=1, model=AmsGrad())


def test_nothing_convertible():
    class Odd(TinyMLP):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, 10), nn.GELU(), nn.Linear(10, 16))

    with pytest.raises(RuntimeError, match="(?s)converted no layer.*in_features=10 is not a multiple of 16"):
        fit(precision="fp8-msamp", steps=1, model=Odd())


def test_everything_excluded():
    with pytest.raises(RuntimeError, match="(?s)converted no layer.*excluded by pattern 'net'"):
        fit(plugins=[MSAMPPrecision(exclude=["net"])], steps=1)


def test_string_flag_and_a_precision_plugin_together():
    with pytest.raises(ValueError, match="Received both `precision=fp8-msamp` and `plugins=MSAMPPrecision"):
        pl.Trainer(**trainer_kwargs(precision="fp8-msamp", plugins=[MSAMPPrecision(level="O1")]))


def test_lbfgs_is_refused():
    class WithLBFGS(TinyMLP):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters())

    with pytest.raises(Exception, match="LBFGS"):
        fit(plugins=[MSAMPPrecision(level="O1")], steps=1, model=WithLBFGS())


def test_layers_converted_with_another_wgrad_mode():
    model = TinyMLP()
    convert_to_fp8(model, wgrad_mode="dequantized", log_table=False)
    with pytest.raises(ValueError, match="wgrad_mode other than 'fp8'"):
        MSAMPPrecision(level="O2").convert_module(model)


def test_fabric_plugin_tracks_one_model():
    plugin = MSAMPFabricPrecision(level="O1")
    plugin.convert_module(TinyMLP())
    with pytest.raises(RuntimeError, match="one plugin instance per model"):
        plugin.convert_module(TinyMLP())


def test_registry_before_conversion():
    with pytest.raises(RuntimeError, match="call convert_module"):
        MSAMPPrecision().registry  # noqa: B018


def test_trainer_reuses_the_plugin_for_a_new_model():
    plugin = MSAMPPrecision(restore_layers=False)
    trainer = pl.Trainer(**trainer_kwargs(max_steps=1, limit_val_batches=0), plugins=[plugin])
    trainer.fit(TinyMLP(), loader())
    other = TinyMLP()
    trainer.validate(other, loader(32), verbose=False)
    assert trainer.precision_plugin.registry.layers["net.0"] is other.net[0]
